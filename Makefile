# `make demo` and `make test` work on a fresh clone: they build .venv from constraints.txt when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean-demo lock

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[pipeline,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/eupe demo --config configs/demo.yaml --out artifacts/demo --data data --version-data

test: $(STAMP)
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/train_throughput.py

clean-demo:
	rm -rf artifacts/demo

# Re-pin every dependency after changing pyproject.toml (commit the result).
lock: $(STAMP)
	$(BIN)/python -m pip freeze --exclude-editable > constraints.txt
