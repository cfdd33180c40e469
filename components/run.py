"""One pipeline run: where each step writes, and the exact ``eupe`` command line of a step.

Engine-agnostic: the local runner, the Airflow tasks and the KFP components all call
:func:`command`. Upstream outputs are read from the upstream step's ``result.json`` (``artifacts``),
so a step needs nothing from the engine but the run's folder and its parameters.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from components.graph import REF, Pipeline, Step

RESULT_FILE = "result.json"


class UnresolvedReference(Exception):
    """A step reads an output that no upstream step produced (skipped, failed or not run yet)."""


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])


def read_json(uri: str) -> Any:
    """Local file or s3:// object (through eupe.storage, imported only when needed)."""
    if uri.startswith("s3://"):
        from eupe import storage

        return storage.read_json(uri)
    with open(uri) as f:
        return json.load(f)


def read_result(folder: str) -> dict:
    """A step's ``result.json``, its artifact paths (written relative to that file) resolved."""
    from eupe import storage

    return storage.read_result(folder)


@dataclass
class PipelineRun:
    pipeline: Pipeline
    artifact_root: str  # local folder or s3:// prefix: runs/ and the model registry models/ live under it
    run_id: str
    params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def create(cls, pipeline: Pipeline, artifact_root: str, run_id: str, params: dict | None = None) -> PipelineRun:
        return cls(pipeline, artifact_root, run_id, {**pipeline.params, **(params or {})})

    @property
    def root(self) -> str:
        """``<artifact root>/runs/<pipeline>/<run id>`` (the run id made safe for a path)."""
        safe = "".join(c if c.isalnum() or c in "-_.+" else "_" for c in self.run_id)
        return join(self.artifact_root, "runs", self.pipeline.name, safe)

    def param(self, name: str) -> Any:
        if name not in self.params:
            raise UnresolvedReference(f"{self.pipeline.name} has no parameter {name!r}")
        return self.params[name]

    def out(self, step: Step | str, item: dict | None = None) -> str:
        name = step if isinstance(step, str) else step.name
        return join(self.root, name, item["name"]) if item else join(self.root, name)

    def result(self, step: str, item: dict | None = None) -> dict:
        uri = join(self.out(step, item), RESULT_FILE)
        try:
            if not uri.startswith("s3://") and not os.path.isfile(uri):
                raise FileNotFoundError(uri)
            return read_result(self.out(step, item))
        except (FileNotFoundError, OSError) as e:
            raise UnresolvedReference(f"{step} has no result ({uri}): did it run?") from e
        except Exception as e:  # noqa: BLE001 - an EupeError from S3, a JSON error: name the file
            raise UnresolvedReference(f"{step}: cannot read {uri}: {e}") from e

    def output(self, step: str, artifact: str) -> str:
        artifacts = self.result(step).get("artifacts", {})
        if artifact not in artifacts:
            raise UnresolvedReference(f"{step} wrote no {artifact!r} (has {sorted(artifacts)})")
        return artifacts[artifact]

    def skipped(self, step: Step) -> bool:
        """``skip_if`` is ``NAME`` (skip when the parameter is set) or ``NAME=VALUE``."""
        if not step.skip_if:
            return False
        name, eq, value = step.skip_if.partition("=")
        return str(self.params.get(name)) == value if eq else bool(self.params.get(name))

    def production(self, model: str) -> str:
        """The production pointer of ``model`` in the registry, or "" before its first promotion, as it was
        when this run first asked: the answer is kept in ``<run>/baselines.json``, so a retried or rerun
        step is compared with the same baseline even after this run itself promoted a model."""
        from eupe import storage

        memo_uri = join(self.root, "baselines.json")
        memo = storage.read_json(memo_uri) if storage.exists(memo_uri) else {}
        if model not in memo:
            uri = join(self.artifact_root, "models", model, "production.json")
            memo[model] = uri if storage.exists(uri) else ""
            storage.write_json(memo_uri, memo)
        return memo[model]

    def _ref(self, ref: str, item: dict | None) -> str:
        errors = []
        for alt in ref.split("|"):
            kind, _, key = alt.partition(":")
            try:
                if kind == "param":
                    value = self.param(key)
                elif kind == "dir":
                    value = self.out(key)
                elif kind == "production":
                    value = self.production(str(self.param(key)))
                elif kind == "item":
                    if item is None or key not in item:
                        raise UnresolvedReference(f"no fan-out element with {key!r}")
                    value = item[key]
                elif self.skipped(self.pipeline.step(kind)):
                    continue  # a skipped step's output is simply not set: the next alternative, or nothing
                else:
                    value = self.output(kind, key)
            except UnresolvedReference as e:
                errors.append(str(e))
                continue
            if value not in (None, ""):
                return str(value)
        if errors:
            raise UnresolvedReference("; ".join(errors))
        return ""

    def command(self, step: Step, item: dict | None = None) -> list[str]:
        """``eupe`` arguments of ``step`` in this run. An option whose value resolves to nothing is left
        out with its flag (an empty ``baseline``: no gate on the first run)."""
        args: list[str] = []
        run_values = {"out": self.out(step, item), "run_id": self.run_id, "artifact_root": self.artifact_root,
                      "run_root": self.root}
        for arg in step.argv:
            if arg.startswith("{all:") and args and args[-1].startswith("--"):  # a flag per element of a fan-out
                from components.plan import items

                upstream = self.pipeline.step(arg[len("{all:"):-1])
                flag = args.pop()
                for element in items(self, upstream.expand):
                    args += [flag, self.out(upstream, element)]
                continue
            value = REF.sub(lambda m: run_values.get(m.group(1)) or self._ref(m.group(1), item), arg)
            if value == "" and args and args[-1].startswith("--"):
                args.pop()
                continue
            args.append(value)
        if "--config" in args:
            for override in self.pipeline.overrides(self.params):
                args += ["--set", override]
        if step.resumable:  # a retried (or re-run) training step continues from its last checkpoint
            args += ["--resume", "auto"]  # ... when the same inputs wrote it; new inputs start over
        return args
