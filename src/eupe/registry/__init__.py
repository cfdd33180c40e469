"""The model registry: ``eupe promote`` publishes a model whose gates passed to
``<root>/models/<name>/<version>/`` and moves ``<root>/models/<name>/production.json``; ``eupe lineage``
reads back where a published version came from (data and checkpoint DVC hashes, config, code, run id).

The helpers are imported lazily, so that ``eupe --help`` (which imports :mod:`eupe.registry.commands`)
does not load PyTorch."""

from __future__ import annotations

from typing import Any

__all__ = ["production_baseline", "read_lineage", "read_pointer", "versions"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from eupe.registry import lineage

        return getattr(lineage, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
