"""``palettelink bench-edge`` on the edge-only install (issue 20, item 5): torch, torchvision and
ultralytics are made absent (a ``sitecustomize`` that refuses them, as in tests/test_cli_habits.py),
the bundle is an edge-only copy, the frames are the sample images that ship with the package; the run
must import none of the heavy modules (``python -X importtime``), honour ``--size`` and ``--threads``,
warm up, repeat and report the median and spread, the CPU and the thread counts, the graph it runs
(fp32 or the bundle's int8 variant, and why) and the codec's overhead over the bare front."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ABSENT_PRELUDE

from palettelink.bundle import MANIFEST

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "ultralytics")

ABSENT = ABSENT_PRELUDE


@pytest.fixture(scope="module")
def edge_install(tmp_path_factory: pytest.TempPathFactory, bundle) -> dict[str, Path]:  # noqa: ANN001
    """An edge-only copy of the bundle and the shim that hides the heavy packages."""
    d = tmp_path_factory.mktemp("edge-install")
    root = d / "bundles"
    dest = root / bundle.name / bundle.version
    dest.mkdir(parents=True)
    for rel in [MANIFEST, *bundle.sides["edge"]]:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(bundle.path / rel, dest / rel)
    shim = d / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(ABSENT)
    return {"root": root, "shim": shim}


def bench_edge(edge_install: dict[str, Path], *args: str, importtime: bool = False,
               timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PALETTELINK_")}
    paths = [str(edge_install["shim"]), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(paths).rstrip(os.pathsep)
    pre = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "palettelink.cli"]
    return subprocess.run([*pre, "bench-edge", "--bundles", str(edge_install["root"]), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


def imported(importtime_stderr: str) -> set[str]:
    return {line.rsplit("|", 1)[1].strip() for line in importtime_stderr.splitlines()
            if line.startswith("import time:") and "|" in line}


def test_bench_edge_runs_on_the_edge_install(edge_install: dict[str, Path], tmp_path: Path) -> None:
    r = bench_edge(edge_install, "--size", "320x240", "--threads", "1", "--warmup", "2", "--repeat", "4",
                   "--out", str(tmp_path), importtime=True)
    assert r.returncode == 0, r.stderr[-3000:]
    mods = imported(r.stderr)
    assert "onnxruntime" in mods and "cv2" in mods, "importtime output not seen"
    heavy = sorted(m for m in mods if m.split(".")[0] in HEAVY)
    assert not heavy, f"bench-edge imported {heavy[:5]}"
    out = r.stdout
    assert "frame(s) at 320x240" in out and "1 intra-op thread(s)" in out and "CPU " in out, out
    assert "2 warm-up frame(s), then 4 timed" in out and "median ms" in out and "p10–p90" in out, out
    assert "total per frame" in out and "fps at the median" in out, out
    rep = json.loads((tmp_path / "bench-edge.json").read_text())
    assert rep["size"] == [320, 240] and rep["threads"] == 1 and rep["usable_cpus"] >= 1
    assert rep["frames"] == ["bus.jpg", "zidane.jpg"]  # the copies that ship with the package
    assert rep["cpu"] and rep["onnxruntime"] and rep["warmup"] == 2 and rep["repeat"] == 4
    total = rep["stages"]["total"]
    assert len(total["samples_ms"]) == 4 and total["p10_ms"] <= total["median_ms"] <= total["p90_ms"]
    assert total["spread_pct"] >= 0 and rep["fps"] == pytest.approx(1e3 / total["median_ms"], rel=0.01)
    assert rep["stages"]["onnx"]["median_ms"] > 0 and rep["bytes_median"] > 0
    assert rep["stages"]["cpu"]["median_ms"] > 0 and rep["cpu_fps_per_core"] > 0  # the CPU time per frame
    # what runs and how (issue 17): the graph the edge picks and why, the session settings, the
    # codec's overhead over the bare front measured on the same frames
    assert rep["graph"]["file"] == "edge.onnx" and rep["graph"]["precision"] == "fp32"
    assert "no int8" in rep["graph"]["reason"] and "graph edge.onnx" in out, out
    assert rep["session"]["intra_op_threads"] == 1 and rep["session"]["inter_op_threads"] == 1
    assert rep["cpus"]["usable_cpus"] == rep["usable_cpus"] and rep["cpus"]["cpu"] == rep["cpu"]
    assert len(rep["stages"]["front"]["samples_ms"]) == 4 and rep["front_graph"]["file"] == "front.onnx"
    assert rep["codec_overhead_pct"] is not None and rep["coding_overhead_pct"] > 0
    assert len(rep["stages"]["coding_cpu"]["samples_ms"]) == 4 and "coding, CPU time" in out
    lo, hi = rep["fps_p10_p90"]
    assert lo <= rep["fps"] <= hi and "codec overhead" in out, out


@pytest.mark.parametrize("args, says", [(["--size", "12"], "expected WIDTHxHEIGHT"),
                                        (["--images", "/nonexistent/cam.jpg"], "/nonexistent/cam.jpg"),
                                        (["--bundle", "nope"], "fetch")])
def test_bench_edge_errors_are_one_line(edge_install: dict[str, Path], tmp_path: Path, args: list[str],
                                        says: str) -> None:
    r = bench_edge(edge_install, *args, "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("palettelink bench-edge: error:") and says in line, line
    assert not (tmp_path / "out").exists()


def test_shipped_samples_are_the_same_pictures() -> None:
    """The copies in the package are byte for byte ultralytics' (reports name either path)."""
    from palettelink.samples import assets_dir, shipped_images

    shipped = shipped_images()
    assert [p.name for p in shipped] == ["bus.jpg", "zidane.jpg"]
    assets = assets_dir()
    if assets is None:
        pytest.skip("ultralytics is not installed here")
    for p in shipped:
        assert p.read_bytes() == (assets / p.name).read_bytes()
