"""``eupe ablation run``: the paper's ablation for one seed, every arm on the same data and budget.

Each arm is a chain of the ordinary steps (``eupe normalize``, ``train``, ``evaluate``), run in this process
into its own folder under ``--out``: each writes its ``result.json`` and is skipped when up to date, so a rerun
(or a retry after a crash) continues where the last one stopped. The arms, in the paper's terms:

* ``direct`` (stage 2 only): the teachers distilled straight into the student. It is stage 1's multi-teacher
  distillation with the student in the proxy's place, on stage 2's budget (iterations, batch, learning rate,
  adapter width, resolutions), so that it differs from ``proxy`` only in what the student learns from.
* ``proxy`` (stages 1+2): the teachers into the proxy, the proxy into the student.
* ``full`` (stages 1+2+3): ``proxy``'s student, then the multi-resolution stage 3.
* ``ta`` (proxy -> teaching assistant -> student, the paper's future work): stage 2 trains ``ablation.ta`` from
  the proxy, then stage 2 again with the assistant as the student's only target. Same student budget as
  ``proxy``; the assistant's own training is extra compute.

Every arm ends with ``eupe evaluate`` of the student on the held-out split; ``ablation.json`` collects the
metrics of each arm.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from eupe import storage
from eupe.config import Config, ModelSpec
from eupe.errors import EupeError
from eupe.results import write_result

log = logging.getLogger("eupe.ablation")

ARM_ROWS = {"direct": "stage 2 only", "proxy": "stages 1+2", "full": "stages 1+2+3", "ta": "1+2 via TA"}
METRICS = ("knn_top1", "keypoint_pck", "seg_miou", "depth_rmse")
ABLATION_FILE = "ablation.json"


def _spec(spec: ModelSpec) -> str:
    """A model spec as one ``--set`` value (JSON is YAML), without weights: the step's input flags give those."""
    return json.dumps(spec.model_dump(mode="json", exclude={"weights"}))


@dataclass
class Chain:
    """The ordinary ``eupe`` steps of one seed, run in this process, each into ``out/<arm>/<step>``."""

    config: str | None
    overrides: list[str]
    data: str | None
    teachers: str | None
    seed: int
    out: str
    split_seed: int  # one held-out set for every seed: the spread is the training's, not the split's
    ran: list[str] = field(default_factory=list)

    def step(self, arm: str, name: str, *argv: str, sets: tuple[str, ...] = (), teachers: bool = True) -> str:
        from eupe.cli import main

        out = f"{self.out.rstrip('/')}/{arm}/{name}"
        full = [argv[0], *(("--config", self.config) if self.config else ()),
                *[a for o in [*self.overrides, f"seed={self.seed}", f"eval.split_seed={self.split_seed}", *sets] for a in ("--set", o)],
                *(("--data", self.data) if self.data else ()),
                *(("--teachers", self.teachers) if self.teachers and teachers else ()), *argv[1:],
                *(("--resume", "auto") if argv[0] == "train" else ()), "--out", out]  # a retry continues training
        log.info("ablation seed %d, arm %s: eupe %s", self.seed, arm, " ".join(full))
        t0 = time.perf_counter()
        code = main(full)
        if code != 0:
            raise EupeError(f"ablation seed {self.seed}, arm {arm}: `eupe {' '.join(full[:1])}` into {out} exited {code}")
        self.ran.append(f"{arm}/{name} ({time.perf_counter() - t0:.0f} s)")
        return out

    @staticmethod
    def artifact(out: str, name: str) -> str:
        return storage.read_result(out)["artifacts"][name]


def _direct(c: Chain, cfg: Config) -> str:
    s2 = cfg.stage2
    budget = (f"proxy={_spec(cfg.student)}", f"stage1.iters={s2.iters}", f"stage1.batch_size={s2.batch_size}",
              f"stage1.micro_batch_size={s2.micro_batch_size}", f"stage1.lr={s2.lr}",
              f"stage1.warmup_iters={s2.warmup_iters}", f"stage1.adapter_hidden={s2.adapter_hidden}",
              f"stage1.resolutions={json.dumps(s2.resolutions)}")
    norm = c.step("direct", "normalize", "normalize", "--stage", "1", sets=budget)
    train = c.step("direct", "train", "train", "--stage", "1", "--norm", c.artifact(norm, "stats"), sets=budget)
    return c.step("direct", "evaluate", "evaluate", "--encoder", "proxy", "--weights", c.artifact(train, "encoder"),
                  sets=budget, teachers=False)


def _proxy(c: Chain) -> tuple[str, str, str]:
    """Stage 1 then 2: (the proxy's weights, stage 2's output folder, stage 2's statistics)."""
    n1 = c.step("proxy", "normalize_stage1", "normalize", "--stage", "1")
    t1 = c.step("proxy", "train_stage1", "train", "--stage", "1", "--norm", c.artifact(n1, "stats"))
    proxy = c.artifact(t1, "encoder")
    n2 = c.step("proxy", "normalize_stage2", "normalize", "--stage", "2", "--proxy", proxy)
    t2 = c.step("proxy", "train_stage2", "train", "--stage", "2", "--proxy", proxy, "--norm", c.artifact(n2, "stats"))
    return proxy, t2, c.artifact(n2, "stats")


def _evaluate_student(c: Chain, arm: str, weights: str, sets: tuple[str, ...] = ()) -> str:
    return c.step(arm, "evaluate", "evaluate", "--encoder", "student", "--weights", weights, sets=sets, teachers=False)


def _full(c: Chain, proxy: str, stage2: str) -> str:
    n3 = c.step("full", "normalize_stage3", "normalize", "--stage", "3", "--proxy", proxy)
    t3 = c.step("full", "train_stage3", "train", "--stage", "3", "--proxy", proxy, "--norm", c.artifact(n3, "stats"),
                "--init", c.artifact(stage2, "checkpoint_model"))
    return _evaluate_student(c, "full", c.artifact(t3, "encoder"))


def _ta(c: Chain, cfg: Config, proxy: str, norm2: str) -> str:
    ta = cfg.ablation.ta
    assert ta is not None
    as_student = (f"student={_spec(ta)}",)
    t_ta = c.step("ta", "train_assistant", "train", "--stage", "2", "--proxy", proxy, "--norm", norm2, sets=as_student)
    assistant = c.artifact(t_ta, "encoder")
    as_proxy = (f"proxy={_spec(ta)}",)
    n = c.step("ta", "normalize_student", "normalize", "--stage", "2", "--proxy", assistant, sets=as_proxy)
    t = c.step("ta", "train_student", "train", "--stage", "2", "--proxy", assistant, "--norm", c.artifact(n, "stats"),
               sets=as_proxy)
    return _evaluate_student(c, "ta", c.artifact(t, "encoder"))


def run_ablation(cfg: Config, config: str | None, overrides: list[str], data: str | None, teachers: str | None,
                 seed: int, out: str) -> dict:
    """Every arm of ``cfg.ablation.arms`` for ``seed``; ``ablation.json`` and ``result.json`` in ``out``."""
    if Path(out).is_file():
        raise EupeError(f"--out {out}: is a file, not a folder")
    arms = [a for a in cfg.ablation.arms if a != "ta" or cfg.ablation.ta is not None]
    if "ta" in cfg.ablation.arms and cfg.ablation.ta is None:
        log.warning("ablation: arm ta skipped: the config sets no ablation.ta (the teaching assistant's model)")
    c = Chain(config, overrides, data, teachers, seed, out, cfg.eval.split_seed_for(cfg.seed))
    evaluations: dict[str, str] = {}
    started = time.perf_counter()
    if "direct" in arms:
        evaluations["direct"] = _direct(c, cfg)
    if {"proxy", "full", "ta"} & set(arms):
        proxy, stage2, norm2 = _proxy(c)
        if "proxy" in arms:
            evaluations["proxy"] = _evaluate_student(c, "proxy", c.artifact(stage2, "encoder"))
        if "full" in arms:
            evaluations["full"] = _full(c, proxy, stage2)
        if "ta" in arms:
            evaluations["ta"] = _ta(c, cfg, proxy, norm2)
    rows = {}
    for arm, folder in evaluations.items():
        m = storage.read_result(folder)["metrics"]
        rows[arm] = {"row": ARM_ROWS[arm], "evaluate": storage.relative_to(folder, out),
                     **{k: m.get(k) for k in (*METRICS, "knn_chance")}}
    record = {"seed": seed, "arms": rows, "student": cfg.student.model_dump(mode="json", exclude={"weights"}),
              "ta": cfg.ablation.ta.model_dump(mode="json", exclude={"weights"}) if cfg.ablation.ta else None,
              "budget": {"stage1_iters": cfg.stage1.iters, "stage2_iters": cfg.stage2.iters,
                         "stage3_iters": cfg.stage3.iters}}
    uri = f"{out.rstrip('/')}/{ABLATION_FILE}"
    storage.write_json(uri, record)
    metrics = {f"{arm}.{k}": v for arm, r in rows.items() for k, v in r.items() if k in METRICS}
    metrics["wall_s"] = time.perf_counter() - started
    log.info("ablation seed %d: %s", seed, "; ".join(c.ran))
    return write_result(out, "ablation-run", metrics, {"ablation": uri})
