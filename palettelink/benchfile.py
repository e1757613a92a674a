"""The rate–accuracy results file, ``bench.json``: written by ``palettelink bench``, read by whoever
shows it (the server's dashboard, ``palettelink bench --compare-with``).

It lives in the core, below both the bench (which writes it) and the server (which only reads it),
so the server never imports the bench. Stdlib only.

A report is a JSON object; the keys a reader relies on are ``bundle``, ``metric``, ``images`` (a
list of per-image records, or a count) and ``rows``: one row per (method, rate point) with at least
``method``, ``kind``, ``label``, ``bpp`` and ``ap50`` (``None`` where the point was not measured).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FILE_NAME = "bench.json"


def write(path: Path, report: dict[str, Any]) -> Path:
    """Write ``report`` to ``path`` (indented, one trailing newline). Returns ``path``."""
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def read(path: Path) -> dict[str, Any]:
    """The report at ``path``. ``FileNotFoundError`` when there is none, another ``OSError`` when it
    cannot be read, ``ValueError`` when it is not a bench report (not JSON, not an object, no list of
    rows)."""
    report = json.loads(Path(path).read_text())
    if not isinstance(report, dict):
        raise ValueError(f"a bench report is a JSON object, this is a {type(report).__name__}")
    if not isinstance(report.get("rows", []), list):
        raise ValueError("its 'rows' are not a list")
    return report


def rate_curves(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per method (in the order rows first name them): ``{"method", "kind", "points"}``, the points
    ``{"bpp", "ap50", "label"}`` sorted by bpp; rows without a positive bpp or an AP50 are left out."""
    curves: dict[str, dict[str, Any]] = {}
    for r in report.get("rows", []):
        if r.get("bpp") is None or r.get("ap50") is None or float(r["bpp"]) <= 0:
            continue
        c = curves.setdefault(r["method"], {"method": r["method"], "kind": r.get("kind", ""), "points": []})
        c["points"].append({"bpp": float(r["bpp"]), "ap50": float(r["ap50"]),
                            "label": str(r.get("label", ""))})
    for c in curves.values():
        c["points"].sort(key=lambda p: p["bpp"])
    return list(curves.values())


def rate_summary(report: dict[str, Any], source: str) -> dict[str, Any]:
    """What a viewer draws: ``source`` (the file's name), the bundle, the metric, how many images and
    the :func:`rate_curves`."""
    images = report.get("images")
    return {"source": source, "bundle": str(report.get("bundle", "")),
            "metric": str(report.get("metric", "")),
            "images": len(images) if isinstance(images, list) else images, "curves": rate_curves(report)}
