"""What a checkpoint must share with the run that resumes it, and what a run counts across resumes.

Every checkpoint records the run's fingerprint (input URIs with their digests, the code version), the digest
of its normalization statistics and the whole resolved config. A resume compares them with its own and names
each difference: ``stage2.lr 0.002 -> 0.001``, ``input data sha256:... -> sha256:...``. Fields a user may change
on purpose (``stage2.iters`` to extend a run) pass with ``--allow-config-change``; a code change alone (a bug
fix) only warns.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from eupe.errors import EupeError
from eupe.models.registry import read_state_dict

log = logging.getLogger(__name__)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"stage2": {"lr": 1}, "teachers": [{"name": "a"}]}`` -> ``{"stage2.lr": 1, "teachers.0.name": "a"}``."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in tree):
        items = ((str(i), v) for i, v in enumerate(tree))
    else:
        return {prefix: list(tree) if isinstance(tree, tuple) else tree}
    out: dict[str, Any] = {}
    for key, value in items:
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


_UNSET = object()


def _show(value: Any) -> str:
    return "(unset)" if value is _UNSET else repr(value)


def _allowed(field: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(field, p) or field.startswith(f"{p}.") for p in patterns)


def changes(saved: dict, now: dict, allow: list[str]) -> list[str]:
    """Every config field that differs, as ``field old -> new``, except those ``allow`` names (globs too)."""
    a, b = flatten(saved), flatten(now)
    out = []
    for field in sorted(set(a) | set(b)):
        old, new = a.get(field, _UNSET), b.get(field, _UNSET)
        if old != new and not _allowed(field, allow):
            out.append(f"{field} {_show(old)} -> {_show(new)}")
    return out


def input_changes(saved: dict, now: dict, allow: list[str]) -> list[str]:
    """Inputs of two fingerprints that differ (URI or content digest), named: ``input data sha256:a -> sha256:b``."""
    a, b = saved.get("inputs", {}), now.get("inputs", {})
    out = []
    for name in sorted(set(a) | set(b)):
        if name == "norm" or a.get(name) == b.get(name) or _allowed(name, allow):
            continue
        old, new = a.get(name) or {}, b.get(name) or {}
        if old.get("uri") != new.get("uri"):
            out.append(f"input {name} {old.get('uri', '(none)')} -> {new.get('uri', '(none)')}")
        else:
            out.append(f"input {name} ({new.get('uri')}) {old.get('digest')} -> {new.get('digest')}")
    return out


def mismatch(state: dict, fp: dict, config: dict, norm: str, allow: list[str]) -> str | None:
    """Why the run that wrote checkpoint ``state`` is not this one (``fp``, resolved ``config``), or None."""
    trained, norm_digest = state.get("norm"), fp["inputs"]["norm"]["digest"]
    if trained is not None and trained != norm_digest:
        return f"was trained with normalization statistics {trained}, --norm {norm} is {norm_digest}"
    saved = state.get("fingerprint")
    if saved is None:
        return None
    diffs = input_changes(saved, fp, allow)
    if "config" in state:
        diffs += changes(state["config"], config, allow)
    elif saved.get("config") != fp.get("config"):  # a checkpoint older than the recorded config: hashes only
        diffs.append("the config (another sha256)")
    if saved.get("code") != fp.get("code"):
        log.warning("--resume: the checkpoint was written by code %s, this is %s", saved.get("code"), fp.get("code"))
    return f"was written with other settings: {'; '.join(diffs)}" if diffs else None


@dataclass
class Counters:
    """What ``result.json`` reports for the whole run, across every resume."""

    images: int = 0  # images trained on (global batch x steps)
    skipped: int = 0  # undecodable or oversized files replaced, over all ranks
    train_s: float = 0.0  # seconds in the training loop

    def as_dict(self) -> dict:
        return asdict(self)


def first_line(e: BaseException) -> str:
    """The gist of a library error (``load_state_dict``'s are many lines long), cut to one line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0] if lines else type(e).__name__)[:240]


def load_init(model: nn.Module, uri: str) -> None:
    """Start from an earlier stage's checkpoint, or an encoder file: every encoder weight and no other (a partial
    load, or weights of a deeper encoder, would hide a changed student config), and the adapters whose shapes
    still fit (a stage may change the adapter width)."""
    state = read_state_dict(uri)
    if not any(k.startswith("encoder.") for k in state):  # an encoder alone (encoder.safetensors, a published model)
        state = {f"encoder.{k}": v for k, v in state.items()}
    own = model.state_dict()
    enc = [k for k in own if k.startswith("encoder.")]
    bad = [k for k in enc if k not in state or state[k].shape != own[k].shape]
    if bad:
        raise EupeError(f"--init {uri}: {len(bad)} of {len(enc)} encoder weights missing or of another shape "
                        f"for {type(model.encoder).__name__} (e.g. {bad[0]})")
    extra = [k for k in state if k.startswith("encoder.") and k not in own]
    if extra:
        raise EupeError(f"--init {uri}: {len(extra)} encoder weights that {type(model.encoder).__name__} does not have "
                        f"(e.g. {extra[0]}): a checkpoint of another encoder (deeper, wider)")
    fits = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(fits, strict=False)
