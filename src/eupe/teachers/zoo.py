"""Which teachers of a recipe form the zoo, and where ``eupe teachers train`` puts them (no torch imported)."""

from __future__ import annotations

from eupe.config import Config, TeacherSpec


def zoo(cfg: Config) -> list[tuple[int, TeacherSpec]]:
    """The teachers of the recipe that ``eupe teachers train`` trains: those with a ``train:`` block."""
    return [(i, t) for i, t in enumerate(cfg.teachers) if t.train is not None]


def weights_file(folder: str, name: str) -> str:
    return f"{str(folder).rstrip('/')}/{name}.safetensors"


def zoo_overrides(cfg: Config, folder: str) -> list[tuple[str, object]]:
    """``--teachers DIR``: every zoo teacher's ``weights`` set to ``DIR/<name>.safetensors``."""
    return [(f"teachers.{i}.weights", weights_file(folder, t.name)) for i, t in zoo(cfg)]
