"""The EUPE step graph, declared once: every pipeline step's command, inputs, outputs and resources.

The Airflow DAGs (``dags/``), the local runner (``components.local``) and the Kubeflow pipeline are
built from :data:`PIPELINES`; none of them keeps its own copy of the order of the steps. A step is an
``eupe`` command line whose arguments may hold references, resolved when the step runs:

* ``{out}``: the step's own output folder, ``<artifact root>/runs/<pipeline>/<run id>/<step>``;
* ``{param:NAME}``: a pipeline parameter (the Airflow form, the KFP pipeline arguments);
* ``{STEP:ARTIFACT}``: an output of an upstream step (this is what makes the edges of the graph);
* ``{a|b}``: the first of several references that is set (a reused proxy instead of stage 1);
* ``{item:KEY}``: a field of the element of a fanned-out step (one export per resolution x dtype);
* ``{dir:STEP}``: an upstream step's folder; ``{all:STEP}`` after a flag: the flag once per element of a
  fanned-out step (``--latency DIR`` for every latency run);
* ``{production:PARAM}``: the registry's production pointer of the model named by a parameter, or
  nothing before its first promotion (the quality gate then has no baseline);
* ``{run_id}``, ``{artifact_root}``, ``{run_root}`` (``<artifact root>/runs/<pipeline>/<run id>``): of this run.

Adding a step is one entry here. The module imports nothing heavy: DAG files parse it often.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

REF = re.compile(r"\{([^{}]+)\}")


@dataclass(frozen=True)
class Resources:
    """Requests (= limits) of one step's container: what the pod operator, KFP and the chart ask for."""

    cpu: str = "1"
    memory: str = "4Gi"
    gpus: int = 0


@dataclass(frozen=True)
class Step:
    name: str
    argv: tuple[str, ...]  # arguments of `eupe`, with {references}
    outputs: dict[str, str]  # artifact name -> file (or folder) under {out}
    resources: Resources = Resources()
    retries: int = 2  # exit 1 (a crash, a lost node, S3 down) is retried with back-off; 2 and 3 never
    resumable: bool = False  # always run with `--resume`: a retry continues from the last checkpoint
    skip_if: str | None = None  # "NAME" (a parameter that, when set, makes the step unnecessary) or "NAME=VALUE"
    expand: str | None = None  # fan out over the list this planner returns (see components.plan)
    after: tuple[str, ...] = ()  # upstream steps it reads nothing from but must wait for (a gate, a planner's input)

    @property
    def needs(self) -> tuple[str, ...]:
        """Upstream steps, in order of first reference."""
        seen: list[str] = []
        for arg in self.argv:
            for ref in REF.findall(arg.replace("{all:", "{dir:")):
                for alt in ref.split("|"):
                    kind, colon, key = alt.partition(":")
                    if not colon or kind in ("param", "item", "production"):
                        continue
                    step = key if kind == "dir" else kind
                    if step not in seen:
                        seen.append(step)
        return tuple(seen) + tuple(s for s in self.after if s not in seen)


@dataclass(frozen=True)
class Pipeline:
    name: str
    description: str
    steps: tuple[Step, ...]
    params: dict[str, object] = field(default_factory=dict)  # name -> default
    settings: dict[str, tuple[str, ...]] = field(default_factory=dict)  # param -> config fields it sets

    def overrides(self, params: dict) -> list[str]:
        """``--set`` overrides of every command with a config, from the parameters that map to config fields."""
        return [f"{key}={params[name]}" for name, keys in self.settings.items()
                if params.get(name) not in (None, "") for key in keys]

    def step(self, name: str) -> Step:
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(f"{self.name} has no step {name!r} (has {[s.name for s in self.steps]})")

    def __post_init__(self) -> None:
        names = [s.name for s in self.steps]
        for i, s in enumerate(self.steps):
            for up in s.needs:
                if up not in names[:i]:
                    raise ValueError(f"{self.name}.{s.name} reads {up!r}, which is not an earlier step")


CONFIG = ("--config", "{param:config}")
DATA = ("--data", "{param:dataset_uri}")
PROXY = ("--proxy", "{param:proxy|train_stage1:encoder}")  # a reused proxy, or the one stage 1 trained
PUBLISHED_PROXY = ("--proxy", "{param:proxy}")  # a fine-tune distils a proxy trained before (or the config's
# proxy.weights); with neither, its stage-2/3 steps refuse in one line (no silent random proxy)
GPU_TRAIN = Resources(cpu="8", memory="64Gi", gpus=8)


TEACHERS = ("--teachers", "{dir:teachers}")  # the zoo the teachers step trained (nothing when the recipe has no zoo)


def normalize(stage: int, skip_if: str | None = None, proxy: tuple = PROXY) -> Step:
    return Step(f"normalize_stage{stage}", (
        "normalize", *CONFIG, *DATA, *(proxy if stage > 1 else TEACHERS), "--manifest", "{validate:manifest}",
        "--stage", str(stage), "--out", "{out}"), {"stats": "norm.safetensors"},
        Resources(cpu="4", memory="32Gi", gpus=1), skip_if=skip_if)


def train(stage: int, init: str | None = None, skip_if: str | None = None, proxy: tuple = PROXY) -> Step:
    return Step(f"train_stage{stage}", (
        "train", *CONFIG, *DATA, *(proxy if stage > 1 else TEACHERS), *(("--init", init) if init else ()),
        "--stage", str(stage), "--norm", f"{{normalize_stage{stage}:stats}}", "--out", "{out}"),
        {"encoder": "encoder.safetensors", "checkpoint": "checkpoints/step_*",
         "checkpoint_model": "checkpoints/step_*/model.safetensors", "losses": "losses.json"},
        GPU_TRAIN, retries=3, resumable=True, skip_if=skip_if)


VALIDATE = Step("validate", ("data", "validate", *CONFIG, *DATA, "--out", "{out}"),
                {"manifest": "manifest.parquet", "validation": "validation.json"}, Resources(cpu="4", memory="8Gi"))
# The teacher zoo (`eupe teachers train`): the recipe's teachers with a `train:` block (the demo's: no weights can be
# downloaded there), trained on the data; a recipe of real teachers trains nothing (a quick no-op).
TEACHERS_ZOO = Step("teachers", ("teachers", "train", *CONFIG, *DATA, "--out", "{out}"),
                    {"<teacher>": "<teacher>.safetensors"}, Resources(cpu="4", memory="8Gi", gpus=1), retries=3,
                    resumable=True, skip_if="proxy", after=("validate",))
VERSION_DATA = Step("version_data", ("data", "version", "--path", "{param:dataset_uri}", "--out", "{out}"),
                    {}, Resources(cpu="1", memory="2Gi"))
def evaluate(proxy: tuple = PROXY, after: tuple[str, ...] = ()) -> Step:
    """The quality gate: against ``baseline`` when given, else the production model of ``model_name``."""
    return Step("evaluate", (
        "evaluate", *CONFIG, *DATA, "--encoder", "student", "--weights", "{train_stage3:encoder}",
        "--checkpoint", "{train_stage3:checkpoint_model}", "--norm", "{normalize_stage3:stats}", *proxy,
        "--baseline", "{param:baseline|production:model_name}", "--out", "{out}"),
        {"eval": "eval.json"}, Resources(cpu="4", memory="16Gi", gpus=1), after=after)
# Every encoder side by side on the held-out images: teachers, proxy, student, a random student (the demo's table);
# before the quality gate, so that every run that reaches the summary has it.
COMPARE = Step("compare", (
    "evaluate", "--compare", *CONFIG, *DATA, *TEACHERS, "--proxy", "{train_stage1:encoder}", "--weights",
    "{train_stage3:encoder}", "--out", "{out}"), {"compare": "compare.json"}, Resources(cpu="4", memory="16Gi", gpus=1),
    skip_if="proxy")
EXPORT = Step("export", (
    "export", *CONFIG, *DATA, "--encoder", "student", "--weights", "{train_stage3:encoder}",
    "--resolution", "{item:resolution}", "--dtype", "{item:dtype}", "--only", "{item:only}", "--out", "{out}"),
    {"export": "export.json", "<variant>": "<variant>.pte"}, Resources(cpu="4", memory="16Gi"), expand="export_variants",
    after=("evaluate",))  # nothing is exported that failed the quality gate
LATENCY = Step("latency", (
    "latency", *CONFIG, "--pte", "{item:pte}", "--model", "{param:budget_model}", "--device-class", "{item:device_class}",
    "--budget-ms", "{param:latency_budget_ms}", "--out", "{out}"),
    {"latency": "latency.json"}, Resources(cpu="2", memory="4Gi"), expand="latency_runs", after=("export",))


VERSION_CHECKPOINTS = Step("version_checkpoints", (
    "data", "version", "--path", "{item:checkpoint}", "--repo", "{run_root}", "--like", "{param:dataset_uri}",
    "--dvc-file", "{out}/checkpoint.dvc",
    "--out", "{out}"), {"dvc_file": "checkpoint.dvc"}, Resources(cpu="1", memory="2Gi"), expand="trained_checkpoints", after=("latency",))


def promote(*versions: str) -> Step:
    lineage = [a for step in versions for a in (
        ("--data-version", f"{{dir:{step}}}") if step == "version_data" else ("--checkpoint-version", f"{{all:{step}}}"))]
    return Step("promote", (
        "promote", *CONFIG, "--name", "{param:model_name}", "--registry", "{artifact_root}",
        "--encoder", "{train_stage3:encoder}", "--eval", "{dir:evaluate}", "--export", "{all:export}",
        "--latency", "{all:latency}", *lineage, "--run-id", "{run_id}", "--out", "{out}"),
        {"version": "models/<name>/<version>/", "production": "models/<name>/production.json"},
        Resources(cpu="1", memory="2Gi"), retries=2)


RETRAIN = Pipeline(
    "eupe_retrain",
    "Scheduled retraining: validate and version the data, distil stages 1-3 (or reuse a published proxy), "
    "evaluate against the production model, export, time every .pte on every device class, version the "
    "checkpoints, promote.",
    (VALIDATE, VERSION_DATA, TEACHERS_ZOO, normalize(1, skip_if="proxy"), train(1, skip_if="proxy"), normalize(2),
     train(2), normalize(3), train(3, init="{train_stage2:checkpoint_model}"), COMPARE, evaluate(after=("compare",)),
     EXPORT, LATENCY, VERSION_CHECKPOINTS, promote("version_data", "version_checkpoints")),
    params={"config": "configs/demo.yaml", "dataset_uri": "data", "proxy": "", "baseline": "",
            "model_name": "eupe_student", "budget_model": "demo_student", "device_classes": "", "latency_budget_ms": ""},
)

FINETUNE = Pipeline(
    "eupe_domain_finetune",
    "A domain fine-tune: from a base checkpoint, distil the proxy into the student on the domain's data "
    "(stage 3, or stages 2 then 3), then the same evaluate -> export -> latency -> promote tail.",
    (VALIDATE, normalize(2, "stages=3", PUBLISHED_PROXY),
     train(2, "{param:base_checkpoint}", "stages=3", PUBLISHED_PROXY), normalize(3, proxy=PUBLISHED_PROXY),
     train(3, "{train_stage2:checkpoint_model|param:base_checkpoint}", proxy=PUBLISHED_PROXY),
     evaluate(PUBLISHED_PROXY), EXPORT, LATENCY, VERSION_CHECKPOINTS, promote("version_checkpoints")),
    params={"config": "configs/demo.yaml", "dataset_uri": "data", "base_checkpoint": "", "proxy": "", "baseline": "",
            "student": "", "stages": "3", "steps": "", "lr": "", "model_name": "eupe_domain",
            "budget_model": "demo_student", "device_classes": "", "latency_budget_ms": ""},
    settings={"student": ("student.model",), "steps": ("stage2.iters", "stage3.iters"),
              "lr": ("stage2.lr", "stage3.lr")},
)

# The paper's ablation (stage 2 only / 1+2 / 1+2+3, and proxy -> teaching assistant -> student), one fanned-out
# element per seed, each a chain of the ordinary normalize/train/evaluate commands; then the table over the seeds.
ABLATION_RUN = Step("ablation", (
    "ablation", "run", *CONFIG, *DATA, *TEACHERS, "--seed", "{item:seed}", "--out", "{out}"),
    {"ablation": "ablation.json"}, GPU_TRAIN, retries=3, resumable=True, expand="ablation_seeds", after=("validate",))
ABLATION_REPORT = Step("ablation_report", ("ablation", "report", "--run", "{all:ablation}", "--out", "{out}"),
                       {"table": "ablation.md", "plot": "ablation.png", "json": "ablation.json"},
                       Resources(cpu="1", memory="2Gi"))
ABLATION = Pipeline(
    "eupe_ablation",
    "The paper's ablation on your data: the teachers straight into the student (stage 2 only), through the proxy "
    "(stages 1+2), with stage 3 (1+2+3) and through a teaching assistant, on the same data and budget, once per "
    "seed; ends with the paper's table (mean +- std) and a PNG.",
    (VALIDATE, replace(TEACHERS_ZOO, skip_if=None), ABLATION_RUN, ABLATION_REPORT),
    params={"config": "configs/demo.yaml", "dataset_uri": "data", "seeds": ""},
)

PIPELINES = {p.name: p for p in (RETRAIN, FINETUNE, ABLATION)}
