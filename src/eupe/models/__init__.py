"""Model registry, feature extraction and adapters."""

from eupe.models.adapter import TargetAdapter, resample_tokens
from eupe.models.features import Features, extract_features
from eupe.models.registry import STUDENTS, build_model, check_model_name

__all__ = [
    "STUDENTS",
    "Features",
    "TargetAdapter",
    "build_model",
    "check_model_name",
    "extract_features",
    "resample_tokens",
]
