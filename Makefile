# `make demo` and `make test` work on a fresh clone: they build .venv from constraints.txt when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test kfp bench mutate planted airflow clean-demo lock images ablation

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[pipeline,dev]'
	touch $(STAMP)

# `make demo`: the retraining DAG (dags/eupe_retrain.py) run by `airflow dags test` on Airflow's embedded
# SQLite database in airflow_home/, embedded mode (each task a `python -m components.task` subprocess),
# artifacts under artifacts/runs/eupe_retrain/demo/. The run name (and the logical date) are fixed, so a
# second `make demo` finds every step up to date. The whole Airflow log: airflow_home/demo.log.
AIRFLOW_ENV := AIRFLOW_HOME=$(CURDIR)/airflow_home AIRFLOW__CORE__DAGS_FOLDER=$(CURDIR)/dags \
	AIRFLOW__CORE__LOAD_EXAMPLES=False AIRFLOW_VAR_EUPE_MODE=embedded AIRFLOW_VAR_EUPE_ARTIFACT_ROOT=artifacts \
	AIRFLOW_VAR_EUPE_WORKDIR=$(CURDIR) PATH=$(CURDIR)/$(BIN):$$PATH
DEMO_CONF := "config": "configs/demo.yaml", "dataset_uri": "data", "model_name": "demo_student"
DEMO_PARAMS := {$(DEMO_CONF)}
DEMO_DATE := 2026-01-05T00:00:00+00:00
COMMA := ,
# $(call dags_test,DAG,CONF,NAME): `airflow dags test DAG` on the embedded database with run conf CONF, logged to
# airflow_home/NAME.log; while it runs, each task's start, its progress lines and its end (tools/dag_progress.awk);
# on failure the log's errors and one line, else the run's wall time.
define dags_test
start=$$(date +%s); { $(AIRFLOW_ENV) $(BIN)/airflow dags test $(1) $(DEMO_DATE) -c '$(2)' 2>&1; echo "eupe-dag-exit $$?"; } \
	| awk -v logfile=airflow_home/$(3).log -f tools/iso_seconds.awk -f tools/dag_progress.awk \
	|| { grep -E "AirflowFailException|AirflowException|eupe: error" airflow_home/$(3).log | tail -n 20; \
	     echo "make $(3): the DAG run failed (airflow_home/$(3).log)"; exit 1; }; \
	echo "DAG run $(1)/demo: success in $$(( $$(date +%s) - start )) s"
endef

airflow_home/airflow.db: $(STAMP)
	mkdir -p airflow_home
	$(AIRFLOW_ENV) $(BIN)/airflow db migrate > airflow_home/migrate.log 2>&1 || { tail -n 20 airflow_home/migrate.log; exit 1; }
	touch $@

demo: $(STAMP) airflow_home/airflow.db
	$(BIN)/eupe data synth --out data --num-images 2048 --size 96 160 --dense
	@echo "airflow dags test eupe_retrain $(DEMO_DATE) -c '{\"run_name\": \"demo\", ...}'  (log: airflow_home/demo.log)"
	@$(call dags_test,eupe_retrain,{"run_name": "demo"$(COMMA) $(DEMO_CONF)},demo)
	@run=$$($(AIRFLOW_ENV) $(BIN)/airflow dags list-runs eupe_retrain -o plain 2>/dev/null | awk '$$5 == "$(DEMO_DATE)" {print $$2; exit}'); \
		$(AIRFLOW_ENV) $(BIN)/airflow tasks states-for-dag-run eupe_retrain "$$run" -o plain 2>/dev/null \
		| awk -f tools/iso_seconds.awk -f tools/task_times.awk; echo
	@$(BIN)/python -m components.task --pipeline eupe_retrain --run-id demo --artifact-root artifacts \
		--params '$(DEMO_PARAMS)' --summary

test: $(STAMP)
	$(BIN)/pytest -q

# `make ablation`: the paper's ablation (dags/eupe_ablation.py) on the demo's data and trained teacher zoo, through
# Airflow like `make demo`: stage 2 only / 1+2 / 1+2+3 / via a teaching assistant, seeds $(ABLATION_SEEDS); the
# table (mean +- std) and its PNG under artifacts/runs/eupe_ablation/demo/ablation_report/. Log: airflow_home/ablation.log.
ABLATION_SEEDS ?= 0,1,2
ABLATION_CONF = "config": "configs/demo.yaml", "dataset_uri": "data", "seeds": "$(ABLATION_SEEDS)"
ablation: $(STAMP) airflow_home/airflow.db
	$(BIN)/eupe data synth --out data --num-images 2048 --size 96 160 --dense
	@$(call dags_test,eupe_ablation,{"run_name": "demo"$(COMMA) $(ABLATION_CONF)},ablation)
	@$(BIN)/python -m components.task --pipeline eupe_ablation --run-id demo --artifact-root artifacts \
		--params '{$(ABLATION_CONF)}' --summary

bench: $(STAMP)
	$(BIN)/python benchmarks/train_throughput.py

# Mutation score of the core modules with mutmut 3 (not part of `make test`: ~35 min on 2 busy cores).
# Mutated: [tool.mutmut] only_mutate in pyproject.toml, in a copy under mutants/ (the checkout is never
# touched); scored: [tool.eupe.mutation] (of trainer.py only the step functions, of storage.py only the
# atomic writes). Fast unit tests only, [tool.mutmut] pytest_add_cli_args_test_selection: the in-process
# unit tests of these modules (no training subprocess, no moto server: -k "not s3"); mutmut runs, for each
# mutant, only those of them that call the mutated function. Report: build/mutation.md, build/mutation.json.
MUTATE_JOBS ?= 2
mutate: $(STAMP)
	rm -rf mutants
	set -f; start=$$(date +%s); \
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/mutmut run --max-children $(MUTATE_JOBS) $$($(BIN)/python tools/mutation_report.py --globs) && \
	$(BIN)/python tools/mutation_report.py --wall-s $$(( $$(date +%s) - start ))

# Each bug of the recipe audit planted in a copy of the code, one at a time: every one must fail a test.
planted: $(STAMP)
	$(BIN)/python tools/planted_bugs.py

# The Airflow UI (airflow standalone on 127.0.0.1:$${AIRFLOW_PORT:-8080}, no login) over the same dags/ and airflow_home/.
airflow: $(STAMP)
	bash tools/airflow_ui.sh

# The container images (containers/): CPU as $${EUPE_IMAGE:-eupe:latest}, CUDA as $${EUPE_GPU_IMAGE:-eupe:latest-cuda},
# the tags the cluster mode's pods run (Airflow Variables eupe_image, eupe_gpu_image). No docker engine: one line, exit 0.
images:
	@bash tools/build_images.sh

# The Kubeflow pipelines (components/kfp_pipeline.py), compiled from the step graph: build/eupe_retrain.yaml and
# build/eupe_domain_finetune.yaml, build/eupe_ablation.yaml, to upload to KFP. Images: $${EUPE_IMAGE:-eupe:latest} ($${EUPE_GPU_IMAGE} for the
# GPU steps); artifact root: $${EUPE_ARTIFACT_ROOT:-artifacts} (an s3:// prefix on a cluster).
kfp: $(STAMP)
	$(BIN)/python -m components.kfp_pipeline --out build

clean-demo:
	rm -rf artifacts/demo artifacts/runs/eupe_retrain/demo airflow_home

# Re-pin every dependency after changing pyproject.toml (commit the result).
lock: $(STAMP)
	$(BIN)/python -m pip freeze --exclude-editable > constraints.txt
