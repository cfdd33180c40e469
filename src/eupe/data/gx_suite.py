"""The data gate's expectation suite as a file: ``gx/expectations/eupe_data.json`` of the repository's GX project.

The file is what people review and extend. Its built-in expectations (``meta.eupe_check`` set) are the
checks of :mod:`eupe.data.validate` with the thresholds of the default config; at run time those are built
by code from the run's config (so ``--set validation.min_side=...`` keeps working) and the file must match
what code generates (``python -m eupe.data.gx_suite`` rewrites it; a test fails on drift). Every other
expectation in the file (no ``meta.eupe_check``) is a user's: it is added to the suite as written, a
``"severity": "critical"`` one fails the gate, any other severity warns. ``EUPE_GX_DIR`` points at another
GX project (one with ``expectations/eupe_data.json``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["SUITE_NAME", "generate", "suite_file", "user_expectations"]

SUITE_NAME = "eupe_data"
REPO_GX = Path(__file__).resolve().parents[3] / "gx"  # the checkout's GX project (absent in a wheel install)


def suite_file() -> Path | None:
    """The suite file in use: ``$EUPE_GX_DIR/expectations/eupe_data.json``, else the checkout's; None if absent."""
    gx_dir = Path(os.environ["EUPE_GX_DIR"]) if os.environ.get("EUPE_GX_DIR") else REPO_GX
    path = gx_dir / "expectations" / f"{SUITE_NAME}.json"
    return path if path.is_file() else None


def _entry(expectation: Any) -> dict[str, Any]:
    d = expectation.configuration.to_json_dict()
    d.pop("id", None)
    return d


def generate(expectations: list[Any], user: list[dict[str, Any]] = ()) -> dict[str, Any]:
    """The suite file's JSON: the built-in ``expectations`` (GX objects) then the ``user`` entries as given."""
    import great_expectations as gx

    return {"name": SUITE_NAME, "expectations": [*map(_entry, expectations), *user],
            "meta": {"great_expectations_version": gx.__version__}, "notes": {
                "format": "markdown", "content": [
                    "The EUPE data gate (`eupe data validate`). Entries with `meta.eupe_check` are built by "
                    "code from the run's config (`validation.*`): these values are the defaults. Add your own "
                    "expectations below them; `severity: critical` fails the gate, others warn."]}}


def load(path: Path) -> dict[str, Any]:
    from eupe.errors import EupeError

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EupeError(f"expectation suite {path}: not readable JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("expectations"), list):
        raise EupeError(f"expectation suite {path}: no 'expectations' list")
    return data


def user_expectations(path: Path | None) -> list[tuple[str, str, Any]]:
    """(name, "fail" | "warn", GX expectation) for each expectation of the file that is not a built-in."""
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    from eupe.errors import EupeError

    out = []
    for i, e in enumerate(load(path)["expectations"] if path else []):
        meta = dict(e.get("meta") or {})
        if "eupe_check" in meta:
            continue
        name = meta.get("name") or f"{e.get('type')}({(e.get('kwargs') or {}).get('column', '')})#{i}"
        severity = "fail" if e.get("severity", "critical") == "critical" else "warn"
        meta.update(eupe_check=name, eupe_severity=severity)
        try:
            exp = ExpectationConfiguration(**{**{k: v for k, v in e.items() if k != "id"}, "meta": meta}).to_domain_obj()
        except Exception as err:  # GX raises several kinds for a malformed entry
            raise EupeError(f"expectation suite {path}: entry {i} ({e.get('type')}): {err}") from None
        out.append((name, severity, exp))
    return out


def main() -> None:
    """Rewrite the checkout's suite file from code (default config), keeping the users' entries."""
    import pandas as pd

    from eupe.config import load_config
    from eupe.data.validate import _checks

    path = REPO_GX / "expectations" / f"{SUITE_NAME}.json"
    user = [e for e in load(path)["expectations"] if "eupe_check" not in (e.get("meta") or {})] if path.is_file() else []
    df = pd.DataFrame({"class_ratio": [1.0], "domain_ratio": [1.0]})  # both balance checks apply
    data = generate([c.expectation for c in _checks(df, load_config())], user)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    print(path)


if __name__ == "__main__":
    main()
