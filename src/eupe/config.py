"""Typed recipe configuration. Defaults are the EUPE paper's numbers (arXiv:2603.22387).

A recipe is YAML validated by pydantic; any field can be overridden with ``key.path=value``
(``--set stage2.lr=1e-4``, ``--set teachers.0.img_size=224``). Every failure is one line that
names the file and the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from eupe.arch import check_kwargs
from eupe.errors import EupeError

StageName = Literal["stage1", "stage2", "stage3"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """A timm model: its registry name, native resolution and where its weights come from."""

    model: str = Field(min_length=1)
    img_size: int = Field(default=224, gt=0)
    weights: str | None = None  # local path, s3://bucket/key, or "hub" (timm pretrained via the HF cache)
    kwargs: dict[str, Any] = Field(default_factory=dict)  # timm create_model overrides (tiny test models)
    # The summary ("class") vector: cls (class token), pool (the model's own pooling head before any
    # projection, e.g. PE-core's attention pool), mean (mean patch token), auto (cls if the model has one,
    # else pool). Recorded in norm.safetensors per target so statistics and training agree.
    summary: Literal["auto", "cls", "pool", "mean"] = "auto"

    @field_validator("kwargs")
    @classmethod
    def _arch(cls, v: dict[str, Any]) -> dict[str, Any]:
        return check_kwargs(v)


class TeacherTraining(_Strict):
    """A teacher of the zoo trained here (``eupe teachers train``) when no real weights can be had: tiny teachers
    that each know something different, so that distilling them transfers something (the demo)."""

    # semantic: image classes from the summary vector (the PEcore role); contrastive: the summary vector matched
    # to learned class embeddings by cosine, CLIP-style (PElang); dense: per-patch segmentation classes and depth
    # (DINOv3)
    objective: Literal["semantic", "contrastive", "dense"]
    iters: int = Field(default=150, gt=0)
    batch_size: int = Field(default=32, gt=0)
    lr: float = Field(default=2e-3, gt=0)
    weight_decay: float = Field(default=0.05, ge=0)


class TeacherSpec(ModelSpec):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_\-]+$")
    loss_weight: float = Field(default=1.0, gt=0)
    train: TeacherTraining | None = None  # set: `eupe teachers train` trains it; `--teachers DIR` then loads it


class LossConfig(_Strict):
    """Class token: cosine. Patch tokens: 0.9 * cosine + 0.1 * smooth-L1 (paper)."""

    cls_cosine: float = Field(default=1.0, ge=0)
    patch_cosine: float = Field(default=0.9, ge=0)
    patch_smooth_l1: float = Field(default=0.1, ge=0)
    smooth_l1_beta: float = Field(default=1.0, gt=0)


class NormalizationConfig(_Strict):
    """Per-teacher feature mean/std from a small batch at the start of a stage, then frozen."""

    num_images: int = Field(default=512, gt=0)
    batch_size: int = Field(default=64, gt=0)
    eps: float = Field(default=1e-6, gt=0)


class SourceSpec(_Strict):
    """One dataset of the training mix: an image folder or .tar shards (a glob or a prefix), local or s3://."""

    uri: str = Field(min_length=1)
    weight: float = Field(default=1.0, gt=0)  # relative share of the samples, e.g. 0.9 LVD + 0.1 IN-1k
    domain: str | None = None  # recorded per sample (manifest, balance checks); None: what the source says


class DataConfig(_Strict):
    root: str = "artifacts/demo/data"
    # Weighted mixture (the paper's best: 90% LVD + 10% IN-1k). Empty: ``root`` alone.
    sources: list[SourceSpec] = Field(default_factory=list)
    shuffle_buffer: int = Field(default=1000, gt=0)  # samples held per reader when streaming .tar shards
    num_workers: int = Field(default=4, ge=0)
    crop_scale: tuple[float, float] = (0.35, 1.0)
    hflip: bool = True

    @field_validator("crop_scale")
    @classmethod
    def _scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1] <= 1:
            raise ValueError(f"need 0 < min <= max <= 1, got {list(v)}")
        return v


Severity = Literal["fail", "warn"]


class ValidationSeverity(_Strict):
    """What a broken expectation does: "fail" stops the pipeline (non-zero exit), "warn" only reports."""

    decodable: Severity = "fail"
    formats: Severity = "fail"
    min_side: Severity = "fail"
    resolution_buckets: Severity = "warn"
    class_balance: Severity = "fail"
    domain_balance: Severity = "warn"
    duplicates: Severity = "fail"
    outliers: Severity = "warn"


class ValidationConfig(_Strict):
    """The data gate (``eupe data validate``): a Great Expectations suite over the scan manifest."""

    min_side: int = Field(default=256, gt=0)  # shortest image side, px (the paper's stage-2 resolution)
    allowed_formats: list[str] = Field(default_factory=lambda: ["JPEG", "MPO", "PNG", "WEBP"], min_length=1)
    # Images whose shortest side is >= r, per stage-3 resolution r: one count for all, or {r: count}.
    min_per_bucket: int | dict[int, int] = 1
    max_class_ratio: float = Field(default=3.0, ge=1)  # largest / smallest class count
    max_domain_ratio: float = Field(default=20.0, ge=1)  # largest / smallest domain count
    outlier_z: float = Field(default=6.0, gt=0)  # robust z (median/MAD) of per-image channel mean/std
    max_pixels: int = Field(default=178_956_970, gt=0)  # larger headers are refused undecoded (PIL's limit)
    severity: ValidationSeverity = ValidationSeverity()

    @field_validator("allowed_formats")
    @classmethod
    def _upper(cls, v: list[str]) -> list[str]:
        return [f.upper() for f in v]

    @field_validator("min_per_bucket")
    @classmethod
    def _counts(cls, v: int | dict[int, int]) -> int | dict[int, int]:
        if any(c < 0 for c in ([v] if isinstance(v, int) else v.values())):
            raise ValueError(f"image counts must be >= 0, got {v}")
        return v


class StageConfig(_Strict):
    iters: int = Field(gt=0)
    batch_size: int = Field(gt=0)  # global batch, reached with gradient accumulation
    micro_batch_size: int = Field(default=32, gt=0)  # per device and forward pass
    lr: float = Field(default=2e-5, gt=0)
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1)
    warmup_iters: int = Field(default=0, ge=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = Field(default=1.0, gt=0)
    adapter_hidden: int = Field(gt=0)
    resolutions: list[int] = Field(min_length=1)  # student input sizes; >1 = multi-resolution pyramid
    teacher_resolutions: list[int] | None = None  # None: each teacher at its own img_size
    checkpoint_every: int = Field(default=1000, gt=0)
    log_every: int = Field(default=50, gt=0)

    @field_validator("resolutions", "teacher_resolutions")
    @classmethod
    def _positive(cls, v: list[int] | None) -> list[int] | None:
        if v is not None:
            if not v:
                raise ValueError("must not be empty")
            if any(r <= 0 for r in v):
                raise ValueError(f"sizes must be positive, got {v}")
        return v

    @model_validator(mode="after")
    def _warmup(self) -> StageConfig:
        if self.warmup_iters >= self.iters:
            raise ValueError(f"warmup_iters ({self.warmup_iters}) must be < iters ({self.iters})")
        return self


class DistributedConfig(_Strict):
    """How a stage runs on many devices (``torchrun``): DDP, or FSDP2 sharding per transformer block."""

    strategy: Literal["ddp", "fsdp"] = "ddp"
    shard_targets: bool = True  # fsdp: shard the frozen targets (teachers, proxy) per block too
    activation_checkpointing: bool = False  # recompute each block of the trained encoder in the backward
    compile: bool = False  # torch.compile each block of the trained encoder
    param_dtype: Literal["auto", "bf16", "fp32"] = "auto"  # fsdp: unsharded params (auto: bf16 when autocast is)
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"  # fsdp: gradient reduce-scatter


# Metrics the quality gate knows, with their direction: True = higher is better.
GATED_METRICS: dict[str, bool] = {
    "knn_top1": True, "seg_miou": True, "depth_rmse": False, "depth_delta1": True, "keypoint_pck": True, "fidelity": True,
}


class EvalConfig(_Strict):
    """``eupe evaluate``: frozen-feature probes (k-NN as in DINO, linear seg/depth, PCK@0.1) and the quality gate."""

    resolution: int | None = Field(default=None, gt=0)  # None: the evaluated model's img_size
    label_size: int = Field(default=128, gt=0)  # masks/depth compared at min(label_size, resolution)
    max_images: int = Field(default=2000, gt=1)
    heldout_fraction: float = Field(default=0.25, gt=0, lt=1)
    # which images are held out; None: the recipe's seed. Fixed, it keeps one held-out set across seeds (the ablation)
    split_seed: int | None = Field(default=None, ge=0)
    batch_size: int = Field(default=32, gt=0)
    knn_k: int = Field(default=20, gt=0)
    knn_temperature: float = Field(default=0.07, gt=0)
    probe_epochs: int = Field(default=20, gt=0)
    probe_lr: float = Field(default=1e-3, gt=0)
    probe_weight_decay: float = Field(default=1e-4, ge=0)
    probe_batch_size: int = Field(default=16, gt=0)
    depth_ridge: float = Field(default=1e-3, ge=0)  # the depth probe is a closed-form ridge regression
    ignore_index: int = Field(default=255, ge=0)  # mask value that is not scored (ADE20k-style "unlabelled")
    warp_strength: float = Field(default=0.15, ge=0, lt=0.5)  # corner jitter of the keypoint homography, fraction of the side
    pck_alpha: float = Field(default=0.1, gt=0)
    # A baseline metric this run did not produce (e.g. fidelity without --checkpoint) fails the gate unless true.
    allow_missing_metrics: bool = False
    # Absolute tolerated drop (rise for depth_rmse) against a baseline eval.json, per metric.
    tolerances: dict[str, float] = Field(default_factory=lambda: {
        "knn_top1": 0.01, "seg_miou": 0.01, "depth_rmse": 0.02, "depth_delta1": 0.01, "keypoint_pck": 0.01, "fidelity": 0.01,
    })

    def split_seed_for(self, seed: int) -> int:
        """The seed that draws the held-out images: ``split_seed``, else the recipe's ``seed``."""
        return seed if self.split_seed is None else self.split_seed

    @field_validator("tolerances")
    @classmethod
    def _known(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(v) - set(GATED_METRICS))
        if unknown:
            raise ValueError(f"unknown metrics {unknown} (known: {sorted(GATED_METRICS)})")
        bad = sorted(k for k, t in v.items() if t < 0)
        if bad:
            raise ValueError(f"tolerances must be >= 0: {bad}")
        return v


class ExportConfig(_Strict):
    """``eupe export``: ExecuTorch ``.pte`` per input size (static shapes, XNNPACK), optional int8 PTQ, parity vs eager."""

    resolutions: list[int] = Field(default_factory=lambda: [256], min_length=1)  # the paper's edge figure is at 256 px
    int8: bool = True  # also write an int8 .pte (XNNPACK quantizer, per-channel symmetric, post-training)
    calibration_images: int = Field(default=32, gt=0)  # int8 observers see this many dataset images
    parity_images: int = Field(default=4, gt=0)  # images compared between the .pte and eager PyTorch
    fp32_min_cosine: float = Field(default=0.999, gt=0, le=1)
    int8_min_cosine: float = Field(default=0.95, gt=0, le=1)
    # int8 activations: quantized per input at run time (XNNPACK qd8 GEMMs, no calibration) or with scales
    # calibrated once on calibration_images (static)
    int8_activations: Literal["dynamic", "static"] = "dynamic"
    multi_resolution: bool = True  # with several resolutions, also one .pte with a method per size (forward_<R>)
    require_full_delegation: bool = False  # fail when an operator is left to the portable kernels

    @field_validator("resolutions")
    @classmethod
    def _sizes(cls, v: list[int]) -> list[int]:
        if any(r <= 0 for r in v) or len(set(v)) != len(v):
            raise ValueError(f"sizes must be positive and distinct, got {v}")
        return v


class LatencyConfig(_Strict):
    """``eupe latency``: timed runs of a ``.pte`` here (ExecuTorch runtime) or on a phone (adb), against a budget."""

    warmup: int = Field(default=5, ge=0)
    runs: int = Field(default=30, gt=0)
    budgets: str | None = None  # YAML of device class x model x resolution -> ms (configs/latency_budgets.yaml)
    device_class: str = "ci-cpu"
    executor_runner: str | None = None  # ExecuTorch's executor_runner built for the phone (adb only)
    adb_workdir: str = "/data/local/tmp/eupe"


def _paper_teachers() -> list[TeacherSpec]:
    return [
        TeacherSpec(name="pecore_g", model="vit_pe_core_gigantic_patch14_448", img_size=448, summary="pool"),
        TeacherSpec(name="pelang_g", model="vit_pe_lang_gigantic_patch14_448", img_size=448, summary="mean"),
        TeacherSpec(name="dinov3_hplus", model="vit_huge_plus_patch16_dinov3", img_size=256, summary="cls"),
    ]


class AblationConfig(_Strict):
    """``eupe ablation run``: the paper's ablation (its Table: stage 2 only vs 1+2 vs 1+2+3) and the
    teaching-assistant chain, on the recipe's data and budget, once per seed."""

    # direct: the teachers straight into the student (stage 2 only: stage 1's multi-teacher distillation with the
    # student in the proxy's place, on stage 2's budget); proxy: stages 1+2; full: 1+2+3; ta: proxy -> ta -> student
    arms: list[Literal["direct", "proxy", "full", "ta"]] = Field(
        default_factory=lambda: ["direct", "proxy", "full", "ta"], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    ta: ModelSpec | None = None  # the teaching assistant between proxy and student (arm ta); None: no ta arm

    @field_validator("arms")
    @classmethod
    def _arms_once(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"each arm once, got {v}")
        return v


class Config(_Strict):
    name: str = "eupe"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA and native-bf16 CPUs (AMX/AVX512-BF16)
    data: DataConfig = DataConfig()
    teachers: list[TeacherSpec] = Field(default_factory=_paper_teachers, min_length=1)
    # Stage 1 distils every teacher into a ViT-G proxy of PEcore-G's size (1.9B).
    proxy: ModelSpec = ModelSpec(model="vit_pe_core_gigantic_patch14_448", img_size=448)
    student: ModelSpec = ModelSpec(model="vit_base_patch16_224", img_size=256)
    loss: LossConfig = LossConfig()
    normalization: NormalizationConfig = NormalizationConfig()
    validation: ValidationConfig = ValidationConfig()
    eval: EvalConfig = EvalConfig()
    export: ExportConfig = ExportConfig()
    latency: LatencyConfig = LatencyConfig()
    distributed: DistributedConfig = DistributedConfig()
    ablation: AblationConfig = AblationConfig()
    stage1: StageConfig = StageConfig(
        iters=390_000, batch_size=8192, lr=2e-5, adapter_hidden=1536, resolutions=[448]
    )
    stage2: StageConfig = StageConfig(
        iters=390_000, batch_size=8192, lr=2e-5, adapter_hidden=3072, resolutions=[256], teacher_resolutions=[256]
    )
    stage3: StageConfig = StageConfig(
        iters=100_000,
        batch_size=8192,
        lr=2e-5,
        adapter_hidden=3072,
        resolutions=[256, 384, 512],
        teacher_resolutions=[256, 384, 512],
    )

    @field_validator("teachers")
    @classmethod
    def _unique(cls, v: list[TeacherSpec]) -> list[TeacherSpec]:
        names = [t.name for t in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"teacher names must be unique, repeated: {dup}")
        return v

    def stage(self, name: StageName | int) -> StageConfig:
        key = name if isinstance(name, str) else f"stage{name}"
        return getattr(self, key)


def _set_path(tree: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    node: Any = tree
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise EupeError(f"{source}: override {dotted!r}: no list item {where!r}")
            part = int(part)  # type: ignore[assignment]
        elif not isinstance(node, dict):
            raise EupeError(f"{source}: override {dotted!r}: {'.'.join(parts[:i])!r} is not a section")
        if last:
            node[part] = value
        else:
            if isinstance(node, dict) and part not in node:
                node[part] = {}
            node = node[part]


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``over`` into ``base``: sections merge key by key, lists and scalars replace."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "<root>"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    value = first.get("input")
    shown = "" if isinstance(value, (dict, list)) or first["type"] == "missing" else f" (got {value!r})"
    more = f" [+{len(err.errors()) - 1} more]" if len(err.errors()) > 1 else ""
    return f"{source}: config field {field!r}: {msg}{shown}{more}"


class _UniqueKeys(yaml.SafeLoader):
    """YAML's safe loader refusing a key given twice in one mapping (plain YAML keeps the last one silently:
    a second ``stage2:`` block would replace the first)."""


def _unique_mapping(loader: _UniqueKeys, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: the constructor below says so
            continue
        if first is not None:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r} (first at line {first + 1})",
                                                    key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeys.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def read_yaml(text: str | bytes, source: str) -> Any:
    """A YAML file's content; invalid YAML, a duplicate key or a binary file is one line naming ``source``."""
    try:
        return yaml.load(text, Loader=_UniqueKeys)  # noqa: S506 - a SafeLoader subclass
    except UnicodeDecodeError:
        raise EupeError(f"{source}: not a text (YAML) file") from None
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        problem = getattr(e, "problem", None) if isinstance(e, yaml.constructor.ConstructorError) else None
        raise EupeError(f"{source}: invalid YAML{f' at line {line + 1}' if line is not None else ''}"
                        f"{f': {problem}' if problem else ''}") from None


def load_config(path: str | Path | None = None, overrides: list[str | tuple[str, Any]] | None = None) -> Config:
    """Read a YAML recipe (or the paper defaults when ``path`` is None) and apply overrides: ``"key=value"``
    strings (the value parsed as YAML, as from ``--set``) or ``(key, value)`` pairs taken literally."""
    source = str(path) if path else "<defaults>"
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise EupeError(f"config file not found: {p}")
        try:
            text = p.read_text()
        except UnicodeDecodeError:
            raise EupeError(f"{p}: not a text (YAML) file") from None
        loaded = read_yaml(text, str(p))
        if loaded is not None and not isinstance(loaded, dict):
            raise EupeError(f"{p}: top level must be a mapping, got {type(loaded).__name__}")
        tree = loaded or {}
    tree = _merge(Config().model_dump(mode="python"), tree)
    for item in overrides or []:
        if isinstance(item, tuple):  # (key, value) from an input flag: taken as is, never parsed as YAML
            key, value = item
        elif "=" not in item:
            raise EupeError(f"override {item!r}: expected key.path=value")
        else:
            key, raw = item.split("=", 1)
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError:
                raise EupeError(f"override {item!r}: value is not valid YAML (quote it)") from None
        _set_path(tree, key.strip(), value, source)
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise EupeError(_format_error(e, source)) from None


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
