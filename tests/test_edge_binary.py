"""The one-file edge binary: built with PyInstaller, it fetches its bundle from a live server and
streams bus.jpg (``scripts/check-edge-binary.sh``). It takes minutes (a fresh build venv from PyPI and
a PyInstaller build), so it runs only with ``PALETTELINK_SLOW=1``; the other checks here are quick."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"


def test_entry_script_only_wraps_the_client():
    text = (SCRIPTS / "palettelink_edge_entry.py").read_text()
    assert "from edge.client import main" in text
    assert "torch" not in text


def test_build_script_keeps_torch_out():
    text = (SCRIPTS / "build-edge-binary.sh").read_text()
    assert "--onefile" in text
    assert "--require-hashes -r requirements-edge.lock" in text  # the edge's packages, locked
    for name in ("torch", "ultralytics"):
        assert f"--exclude-module {name}" in text


@pytest.mark.skipif(os.environ.get("PALETTELINK_SLOW") != "1", reason="minutes: set PALETTELINK_SLOW=1")
def test_binary_fetches_and_streams():
    if not (ROOT / "bundles" / "fall-yolov8").is_dir():
        pytest.skip("bundles/fall-yolov8 not built")
    proc = subprocess.run(["bash", str(SCRIPTS / "check-edge-binary.sh")], cwd=ROOT,
                          capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["size_bytes"] > 1_000_000
    assert "box(es)" in proc.stdout
