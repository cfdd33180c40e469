"""The Params of the Airflow DAGs: every pipeline parameter with a description shown in the trigger form,
and the typed, validated form of the domain fine-tune. A value the form refuses never starts a run.

The supported students are listed here (the DAG files must not import timm to learn them); a test checks
the list against ``eupe.models.registry.STUDENTS``. The device classes come from the latency budgets file.
"""

from __future__ import annotations

from pathlib import Path

from airflow.sdk import Param

from components.graph import Pipeline

PROJECT = Path(__file__).resolve().parent.parent
BUDGETS = PROJECT / "configs" / "latency_budgets.yaml"
STUDENTS = ("vit_t", "vit_s", "vit_b", "convnext_t", "convnext_b")  # = eupe.models.registry.STUDENTS
FORM_TO_PIPELINE = {"device_class": "device_classes"}  # a form field -> the pipeline parameter it sets

DOCS = {
    "config": "The recipe: a YAML file of configs/ (in the project, or in the image in cluster mode) or an "
              "s3:// URI. Models, stages, export resolutions and dtypes, latency settings.",
    "dataset_uri": "Training data: a local folder or an s3:// prefix (an image folder or WebDataset .tar shards).",
    "proxy": "A proxy trained before (its encoder.safetensors, local or s3://). Set: stage 1 is skipped and "
             "this proxy is distilled into the student. Empty: stage 1 trains one.",
    "baseline": "eval.json (or a production.json pointer) the quality gate compares with. Empty: the "
                "production model of model_name (no gate before its first promotion).",
    "model_name": "Name the model is published under in the registry: models/<name>/<version>/.",
    "budget_model": "The model's row in configs/latency_budgets.yaml (per device class and resolution).",
    "device_classes": "Comma-separated device classes every exported .pte is timed on. Empty: the recipe's "
                      "latency.device_class.",
    "latency_budget_ms": "Budget for the median latency in ms, for every latency run. Empty: the budgets "
                         "file's row.",
    "seeds": "The ablation's seeds, comma-separated (one run of every arm per seed), e.g. 0,1,2. Empty: the "
             "recipe's ablation.seeds.",
    "run_name": "Folder of this run under runs/<dag>/ (and the run id in the model's lineage). Empty: the "
                "Airflow run id. An earlier run's name continues it: its finished steps are up to date.",
}

# A fine-tune has no stage 1: the proxy it distils is a trained one, from this field or the config's proxy.weights.
FINETUNE_PROXY = ("The trained proxy the student is distilled from (its encoder.safetensors, local or s3://). "
                  "Required unless the config sets proxy.weights: a fine-tune never distils a random proxy.")


def device_classes(path: Path = BUDGETS) -> list[str]:
    import yaml

    return list(yaml.safe_load(path.read_text())["device_classes"])


def _string(name: str, default, description: str | None = None) -> Param:
    """A text field; one without a default may stay empty (Airflow's form requires every field whose type
    does not admit null), and reaches the pipeline as None: not set."""
    description = description or DOCS[name]
    if default in (None, ""):
        return Param(None, type=["null", "string"], title=name, description=description)
    return Param(str(default), type="string", title=name, description=description)


def with_defaults(params: dict[str, Param], defaults: dict, pipeline: str) -> dict[str, Param]:
    """``params`` with other defaults (empty ones leave a Param as it is), of the Param's own type; a name the
    DAG has no Param for is refused."""
    params = dict(params)
    for name, default in defaults.items():
        if default in (None, ""):
            continue
        if name not in params:
            raise ValueError(f"Airflow Variable eupe_params: {pipeline} has no parameter {name!r} (has {sorted(params)})")
        schema = dict(params[name].schema)
        kinds = schema.get("type") if isinstance(schema.get("type"), list) else [schema.get("type")]
        value = int(default) if "integer" in kinds else float(default) if "number" in kinds else str(default)
        params[name] = Param(value, **schema)
    return params


def dag_params(pipeline: Pipeline) -> dict[str, Param]:
    """Every parameter of the pipeline as a string Param with its description, and ``run_name``."""
    params = {name: _string(name, default) for name, default in pipeline.params.items() if name in DOCS}
    params["run_name"] = _string("run_name", "")
    return params


def finetune_form(pipeline: Pipeline) -> dict[str, Param]:
    """The fine-tune's form: typed fields, validated before any task runs (also by ``airflow dags test -c``)."""
    d = pipeline.params
    classes = device_classes()
    return {
        "dataset_uri": Param(str(d["dataset_uri"]), type="string", minLength=1, title="Domain dataset",
                             description="The domain's images: a local folder or an s3:// prefix (image folder "
                                         "or WebDataset shards)."),
        "base_checkpoint": Param(d["base_checkpoint"] or None, type=["null", "string"], title="Base checkpoint",
                                 description="The checkpoint the fine-tune starts from: a model.safetensors of an "
                                             "earlier run (local or s3://). Empty: the recipe's student weights."),
        "student": Param(STUDENTS[0], type="string", enum=list(STUDENTS), title="Student",
                         description="The student architecture (must match the base checkpoint)."),
        "stages": Param(str(d["stages"]), type="string", enum=["3", "2+3"], title="Stages",
                        description="3: the multi-resolution stage only; 2+3: the fixed-resolution stage 2 first."),
        "steps": Param(None, type=["null", "integer"], minimum=1, title="Steps per stage",
                       description="Training iterations of each stage run (at least 1). Empty: the recipe's."),
        "lr": Param(None, type=["null", "number"], exclusiveMinimum=0, title="Learning rate",
                    description="Peak learning rate of each stage run (> 0). Empty: the recipe's."),
        "latency_budget_ms": Param(None, type=["null", "number"], exclusiveMinimum=0, title="Latency budget (ms)",
                                   description="Budget for the median batch-1 latency on the device class (> 0). "
                                               "Empty: the row of configs/latency_budgets.yaml."),
        "device_class": Param("ci-cpu" if "ci-cpu" in classes else classes[0], type="string", enum=classes,
                              title="Device class", description="Where the latency gate times every exported "
                                                                ".pte (a device class of configs/latency_budgets.yaml)."),
        "model_name": Param(str(d["model_name"]), type="string", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                            title="Model name", description="The domain's own name in the registry: "
                                                            "models/<name>/<version>/ (letters, digits, _ . -)."),
        "config": _string("config", d["config"]),
        "proxy": _string("proxy", d["proxy"], FINETUNE_PROXY),
        "budget_model": _string("budget_model", d["budget_model"]),
        "baseline": _string("baseline", d["baseline"]),
        "run_name": _string("run_name", ""),
    }
