"""The bench's results file: what ``palettelink bench`` writes, the dashboard reads back (core reader)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from palettelink import benchfile

COMMITTED = Path(__file__).resolve().parents[1] / "docs" / "results" / "bench-eval.json"


def test_the_committed_report_gives_curves_sorted_by_bpp() -> None:
    summary = benchfile.rate_summary(benchfile.read(COMMITTED), COMMITTED.name)
    assert summary["source"] == "bench-eval.json" and summary["bundle"] == "fall-yolov8/1"
    assert isinstance(summary["images"], int) and summary["images"] > 0
    assert summary["curves"] and {"palette", "jpeg"} <= {c["method"] for c in summary["curves"]}
    for c in summary["curves"]:
        bpps = [p["bpp"] for p in c["points"]]
        assert bpps == sorted(bpps) and all(b > 0 for b in bpps)


def test_write_then_read_and_rows_without_a_point_are_left_out(tmp_path: Path) -> None:
    report = {"bundle": "b/1", "metric": "AP", "images": 3, "rows": [
        {"method": "m", "kind": "features", "label": "L2", "bpp": 0.5, "ap50": 0.9},
        {"method": "m", "kind": "features", "label": "L4", "bpp": 0.1, "ap50": 0.7},
        {"method": "m", "kind": "features", "label": "f32", "bpp": 0.2, "ap50": None},
        {"method": "n", "kind": "image", "label": "q0", "bpp": 0, "ap50": 0.1}]}
    path = benchfile.write(tmp_path / benchfile.FILE_NAME, report)
    assert benchfile.read(path) == report
    assert benchfile.rate_summary(report, path.name) == {
        "source": "bench.json", "bundle": "b/1", "metric": "AP", "images": 3,
        "curves": [{"method": "m", "kind": "features",
                    "points": [{"bpp": 0.1, "ap50": 0.7, "label": "L4"},
                               {"bpp": 0.5, "ap50": 0.9, "label": "L2"}]}]}


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        benchfile.read(tmp_path / "none.json")
    for text in ("{not json", "[1, 2]", json.dumps({"rows": {"a": 1}})):
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(ValueError):
            benchfile.read(tmp_path / "bad.json")
