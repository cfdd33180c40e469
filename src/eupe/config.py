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


class TeacherSpec(ModelSpec):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_\-]+$")
    loss_weight: float = Field(default=1.0, gt=0)


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


class DataConfig(_Strict):
    root: str = "artifacts/demo/data"
    num_workers: int = Field(default=4, ge=0)
    crop_scale: tuple[float, float] = (0.35, 1.0)
    hflip: bool = True

    @field_validator("crop_scale")
    @classmethod
    def _scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1] <= 1:
            raise ValueError(f"need 0 < min <= max <= 1, got {list(v)}")
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


def _paper_teachers() -> list[TeacherSpec]:
    return [
        TeacherSpec(name="pecore_g", model="vit_pe_core_gigantic_patch14_448", img_size=448),
        TeacherSpec(name="pelang_g", model="vit_pe_lang_gigantic_patch14_448", img_size=448),
        TeacherSpec(name="dinov3_hplus", model="vit_huge_plus_patch16_dinov3", img_size=256),
    ]


class Config(_Strict):
    name: str = "eupe"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    data: DataConfig = DataConfig()
    teachers: list[TeacherSpec] = Field(default_factory=_paper_teachers, min_length=1)
    # Stage 1 distils every teacher into a ViT-G proxy of PEcore-G's size (1.9B).
    proxy: ModelSpec = ModelSpec(model="vit_pe_core_gigantic_patch14_448", img_size=448)
    student: ModelSpec = ModelSpec(model="vit_base_patch16_224", img_size=256)
    loss: LossConfig = LossConfig()
    normalization: NormalizationConfig = NormalizationConfig()
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


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML recipe (or the paper defaults when ``path`` is None) and apply ``key=value`` overrides."""
    source = str(path) if path else "<defaults>"
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise EupeError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            line = getattr(getattr(e, "problem_mark", None), "line", None)
            raise EupeError(f"{p}: invalid YAML{f' at line {line + 1}' if line is not None else ''}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise EupeError(f"{p}: top level must be a mapping, got {type(loaded).__name__}")
        tree = loaded or {}
    tree = _merge(Config().model_dump(mode="python"), tree)
    for item in overrides or []:
        if "=" not in item:
            raise EupeError(f"override {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        _set_path(tree, key.strip(), yaml.safe_load(raw), source)
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise EupeError(_format_error(e, source)) from None


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
