"""Latency budgets: device class x model x input resolution -> milliseconds (``configs/latency_budgets.yaml``)."""

from __future__ import annotations

from pydantic import Field, ValidationError

from eupe import storage
from eupe.config import _format_error, _Strict, read_yaml
from eupe.errors import EupeError


class Budget(_Strict):
    budget_ms: float = Field(gt=0, allow_inf_nan=False)
    gflops: float | None = Field(default=None, gt=0)  # the model's forward at this size, for reference
    source: str | None = None


class DeviceClass(_Strict):
    description: str = ""
    reference: bool = False  # a published figure, not a machine this pipeline reaches
    models: dict[str, dict[int, Budget]] = Field(default_factory=dict)


class Budgets(_Strict):
    device_classes: dict[str, DeviceClass] = Field(min_length=1)

    def lookup(self, device_class: str, model: str, resolution: int, source: str) -> Budget:
        """The budget of one row; a missing row fails with the rows that exist."""
        if device_class not in self.device_classes:
            raise EupeError(f"{source}: no device class {device_class!r} (have {sorted(self.device_classes)})")
        models = self.device_classes[device_class].models
        if model not in models:
            raise EupeError(f"{source}: device class {device_class!r} has no model {model!r} (have {sorted(models)})")
        if resolution not in models[model]:
            raise EupeError(f"{source}: {device_class}/{model} has no budget at {resolution} px "
                            f"(have {sorted(models[model])})")
        return models[model][resolution]


def load_budgets(uri: str) -> Budgets:
    if not storage.exists(uri):
        raise EupeError(f"latency budgets file not found: {uri}")
    tree = read_yaml(storage.read_bytes(uri), uri)
    try:
        return Budgets.model_validate(tree if isinstance(tree, dict) else {})
    except ValidationError as e:
        raise EupeError(_format_error(e, uri)) from None
