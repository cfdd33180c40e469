"""``python -m eupe.data.dvc_cli <args>``: DVC's command line with its YAML/JSON/TOML files (``.dvc`` files,
``dvc.lock``) written atomically.

DVC (3.x) rewrites a ``.dvc`` file in place (``open(path, "w+")``). A step killed while ``dvc add`` or ``dvc
commit`` writes one leaves it truncated: the dataset's pointer, committed to git for ``data.dvc``, is lost, and
the next ``dvc`` call in that repository fails to parse it. Here every local file DVC serializes is written by
``eupe.storage``'s atomic write, its temporary file (``.<name>.tmp-XXXXXXXX``) in the repository's ``.dvc/tmp/``:
after a kill the file holds the old version or the new one, and the temporary file a killed run left is removed
by the next one (:mod:`eupe.data.versioning`).

``EUPE_DVC_DROP_INDEXES=1``: forget DVC's indexes first (the next push after a killed one).
Files on a remote filesystem (``fs=`` given) are written as DVC writes them."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path


def _atomic_dump_data(path, data, dumper, fs=None, **dumper_args):
    protocol = getattr(fs, "protocol", None)
    if fs is not None and not {"local", "file"} & set(protocol if isinstance(protocol, tuple) else (protocol,)):
        return _original(path, data, dumper=dumper, fs=fs, **dumper_args)
    from eupe import storage

    text = io.StringIO()
    dumper(data, text, **dumper_args)
    path = Path(os.path.abspath(os.fspath(path)))
    storage.atomic_write_local(path, text.getvalue().encode("utf-8"), tmp_dir=_temp_folder(path))
    return None


def _temp_folder(path: Path) -> Path | None:
    """The repository's ``.dvc/tmp`` (DVC runs in the repository's root) when it is on the file's filesystem, so
    that nothing is left beside a tracked file after a kill; else None (beside the file)."""
    tmp = Path.cwd() / ".dvc" / "tmp"
    try:
        return tmp if tmp.stat().st_dev == path.parent.stat().st_dev else None
    except OSError:
        return None


def _drop_indexes() -> None:
    """Forget DVC's indexes (``<site_cache_dir>/index/``): what each remote holds, and the data index, where a
    push first collects the entries it will push. Either can outlive its truth after a killed push: DVC clears
    a remote index in several transactions, so a push killed while clearing leaves file entries without their
    ``.dir``, which DVC then trusts; and a push killed while collecting leaves part of its entries, which the
    next push takes for the whole list, pushing the ``.dir`` with only some of its files. Both are caches: DVC
    rebuilds them by asking the workspace, the cache and the remote."""
    import shutil

    from dvc.repo import Repo

    with Repo(os.getcwd(), uninitialized=True) as repo:
        shutil.rmtree(os.path.join(repo.site_cache_dir, "index"), ignore_errors=True)


def patch() -> None:
    """Route DVC's serializers through :func:`_atomic_dump_data` (each module imported the function by name)."""
    global _original
    from dvc.utils.serialize import _common, _json, _py, _toml, _yaml

    if _common._dump_data is _atomic_dump_data:
        return
    _original = _common._dump_data
    for module in (_common, _json, _py, _toml, _yaml):
        if getattr(module, "_dump_data", None) is not _original:
            raise RuntimeError(f"dvc changed: {module.__name__}._dump_data is not dvc.utils.serialize._common's")
        module._dump_data = _atomic_dump_data


_original = None


def main(argv: list[str] | None = None) -> int:
    patch()
    if os.environ.get("EUPE_DVC_DROP_INDEXES") == "1":
        _drop_indexes()
    from dvc.cli import main as dvc_main

    return dvc_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
