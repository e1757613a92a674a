"""The GPU path's tooling on a machine without a GPU (issue 17): ``bench-serve --device cuda`` falls
back to the CPU and says why, and ``scripts/bench-gpu.sh`` runs, falls back and says there is no GPU.
Its JSON carries the spread over runs, the CPU and the thread counts. Short runs: no figure is
checked, only that they exist."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import BIN, REPO, env


def _has_gpu() -> bool:
    import torch

    return bool(torch.cuda.is_available())


pytestmark = pytest.mark.skipif(_has_gpu(), reason="a GPU is visible: the fallback cannot be seen here")


def test_bench_serve_cuda_falls_back_with_a_message(bundles_root: Path, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    from palettelink.cli import main

    out = tmp_path / "serve.json"
    rc = main(["bench-serve", "--bundles", str(bundles_root), "--codec", "baseline", "--bits", "2",
               "--seconds", "1", "--warmup", "0.5", "--repeat", "2", "--no-batching", "--device", "cuda",
               "--out", str(out)])
    got = capsys.readouterr()
    assert rc == 0, got.out + got.err
    assert "no GPU" in got.err and "falls back to cpu" in got.err, got.err
    assert "frames/s" in got.out and "p10–p90" in got.out and "threads: torch" in got.out
    rep = json.loads(out.read_text())
    assert rep["requested_device"] == "cuda" and rep["torch_device"] == "cpu"
    assert rep["fallback"].startswith("no GPU") and rep["cuda_device"] is None
    assert rep["cpus"]["cpu"] and rep["cpus"]["usable_cpus"] >= 1
    assert rep["torch_threads"] >= 1 and rep["onnxruntime_intra_op_threads"] >= 1
    assert rep["repeat"] == 2 and rep["tasks"] == ["detect"]
    (row,) = rep["results"]
    assert row["codec"] == "baseline" and row["task"] == "detect" and row["mode"] == "batch 1"
    assert row["runs"] == 2 and len(row["frames_per_s_runs"]) == 2
    f = row["fps"]
    assert f["p10"] <= f["median"] <= f["p90"] and f["spread_pct"] >= 0
    assert row["frames_per_s"] == f["median"]


def test_bench_serve_refuses_a_task_the_bundle_lacks(bundles_root: Path, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    from palettelink.cli import main

    rc = main(["bench-serve", "--bundles", str(bundles_root), "--task", "pose", "--device", "cpu",
               "--out", str(tmp_path / "x.json")])
    assert rc == 2 and "pose" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_bench_gpu_script_says_no_gpu_and_falls_back(bundles_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "gpu"
    e = env(PALETTELINK_BUNDLES=str(bundles_root), OUT=str(out), SKIP_SETUP="1", SECONDS_PER_RUN="1",
            PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    r = subprocess.run(["bash", str(REPO / "scripts" / "bench-gpu.sh")], capture_output=True, text=True,
                       timeout=600, env=e, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    first = r.stdout.splitlines()[0]
    assert first.startswith("bench-gpu: no GPU:") and "falling back to the CPU" in first, r.stdout
    assert "no GPU" in r.stderr and "falls back to cpu" in r.stderr  # bench-serve's own fallback
    assert "frames/s" in r.stdout and "on cpu (no GPU)" in r.stdout.splitlines()[-1]
    rep = json.loads((out / "bench-gpu-fallback.json").read_text())
    assert rep["requested_device"] == "cuda" and rep["fallback"] and rep["results"]


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_bench_gpu_script_is_clean_shell() -> None:
    r = subprocess.run(["shellcheck", str(REPO / "scripts" / "bench-gpu.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
