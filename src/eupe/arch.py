"""The timm architecture arguments a recipe may set (``kwargs`` of a model), each with its check.

Anything else is refused: ``kwargs`` reach ``timm.create_model``, where ``checkpoint_path`` would load any
local file, ``pretrained_cfg_overlay`` another download URL, and an impossible value (``embed_dim: -5``)
dies deep inside a constructor. No torch import: the config module uses it.
"""

from __future__ import annotations

from typing import Any, Callable

_GLOBAL_POOLS = ("", "avg", "token", "map", "max", "avgmax", "fast")


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _number(low: float, high: float | None = None, low_open: bool = False) -> Callable[[Any], bool]:
    def ok(v: Any) -> bool:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            return False
        return (v > low if low_open else v >= low) and (high is None or v < high)
    return ok


def _positive_ints(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and len(v) > 0 and all(_positive_int(x) for x in v)


def _bool(v: Any) -> bool:
    return isinstance(v, bool)


_RATE = _number(0.0, 1.0)
CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    **{k: (_positive_int, "a positive integer") for k in (
        "embed_dim", "depth", "num_heads", "patch_size", "reg_tokens", "num_reg_tokens", "attn_pool_num_heads")},
    **{k: (_number(0.0, low_open=True), "a positive number") for k in ("mlp_ratio", "attn_pool_mlp_ratio")},
    **{k: (_RATE, "a number in [0, 1)") for k in (
        "drop_rate", "drop_path_rate", "attn_drop_rate", "proj_drop_rate", "pos_drop_rate", "patch_drop_rate")},
    **{k: (lambda v: v is None or _number(0.0, low_open=True)(v), "a positive number or null")
       for k in ("init_values", "ls_init_value")},
    **{k: (_positive_ints, "a non-empty list of positive integers") for k in ("depths", "dims")},
    **{k: (_bool, "true or false") for k in (
        "qkv_bias", "qk_norm", "class_token", "no_embed_class", "dynamic_img_size", "dynamic_img_pad",
        "use_rot_pos_emb", "use_abs_pos_emb", "use_fc_norm", "use_pre_transformer_norm",
        "use_post_transformer_norm", "conv_bias")},
    "global_pool": (lambda v: v in _GLOBAL_POOLS, f"one of {list(_GLOBAL_POOLS)}"),
}


def check_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` unchanged when every key is an architecture argument with a valid value; else ValueError
    naming the first key at fault."""
    for key, value in kwargs.items():
        if key not in CHECKS:
            raise ValueError(f"{key!r} is not a timm architecture argument a recipe may set "
                             f"(allowed: {', '.join(sorted(CHECKS))})")
        ok, want = CHECKS[key]
        if not ok(value):
            raise ValueError(f"{key} must be {want}, got {value!r}")
    return kwargs
