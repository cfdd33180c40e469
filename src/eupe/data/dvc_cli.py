"""``python -m eupe.data.dvc_cli <args>``: DVC's command line with its YAML/JSON/TOML files (``.dvc`` files,
``dvc.lock``) written atomically.

DVC (3.x) rewrites a ``.dvc`` file in place (``open(path, "w+")``). A step killed while ``dvc add`` or ``dvc
commit`` writes one leaves it truncated: the dataset's pointer, committed to git for ``data.dvc``, is lost, and
the next ``dvc`` call in that repository fails to parse it. Here every local file DVC serializes goes to a
temporary file in the repository's ``.dvc/tmp/`` (``eupe-<name>.tmp-<pid>-<hex>``), is flushed to disk, and
replaces the old one in one rename: after a kill the file holds the old version or the new one, and the
temporary file a killed run left is removed by the next one (:mod:`eupe.data.versioning`).

``EUPE_DVC_DROP_INDEXES=1``: forget DVC's indexes first (the next push after a killed one).
Files on a remote filesystem (``fs=`` given) are written as DVC writes them."""

from __future__ import annotations

import os
import sys


def _atomic_dump_data(path, data, dumper, fs=None, **dumper_args):
    protocol = getattr(fs, "protocol", None)
    if fs is not None and not {"local", "file"} & set(protocol if isinstance(protocol, tuple) else (protocol,)):
        return _original(path, data, dumper=dumper, fs=fs, **dumper_args)
    from eupe.storage import temp_name

    path = os.path.abspath(os.fspath(path))
    tmp = os.path.join(_temp_folder(path), temp_name(f"eupe-{os.path.basename(path)}", "tmp"))
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            dumper(data, f, **dumper_args)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return None


def _temp_folder(path: str) -> str:
    """The repository's ``.dvc/tmp`` (DVC runs in the repository's root) when it is on the file's filesystem, so
    that nothing is left beside a tracked file after a kill; else the file's own folder."""
    folder, tmp = os.path.dirname(path), os.path.join(os.getcwd(), ".dvc", "tmp")
    try:
        if os.stat(tmp).st_dev == os.stat(folder).st_dev:
            return tmp
    except OSError:
        pass
    return folder


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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
