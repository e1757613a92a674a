"""``palettelink bench-serve`` (issue 10, item 6), short: frames/s of decode + task through the real
Service at batch 1 and with dynamic batching, the device named, a table printed and JSON written."""

from __future__ import annotations

import json
from pathlib import Path

from palettelink.bench.serve import device_name


def test_bench_serve_reports_batch_1_and_batched(bundles_root: Path, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    from palettelink.cli import main

    out = tmp_path / "serve.json"
    rc = main(["bench-serve", "--bundles", str(bundles_root), "--codec", "baseline", "--bits", "2",
               "--seconds", "2", "--warmup", "1", "--max-batch", "2", "--clients", "4", "--device", "cpu",
               "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "frames/s" in text and "dynamic batching" in text and "batch 1" in text
    rep = json.loads(out.read_text())
    assert rep["device"] == device_name("cpu") and "CPUs usable" in rep["device"]
    rows = {(r["codec"], r["max_batch"]): r for r in rep["results"]}
    assert set(rows) == {("baseline", 1), ("baseline", 2)}
    assert all(r["frames_per_s"] > 0 and r["n_errors"] == 0 for r in rows.values())
    assert rows[("baseline", 1)]["mean_batch"] == 1
    assert 1 <= rows[("baseline", 2)]["mean_batch"] <= 2
