"""The README's first command, as a new user runs it: ``bash scripts/demo.sh`` with a fresh HOME and
no ultralytics settings yet (its first-run banner once broke the demo), against the session bundle so
the test does not rebuild it. The palette rows must name the same classes as the uncompressed
detector on the sample images."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FRAME = re.compile(r"^(\S+\.(?:jpg|png))\s+[\d,]+ B\s+[\d.]+ bpp\s+(\S+)")
BOX = re.compile(r"^\s+(\S+)\s+([\d.]+)\s+\[")


def fresh_env(tmp: Path, bundles: Path) -> dict[str, str]:
    keep = ("PATH", "LANG", "LC_ALL", "TMPDIR", "PYTHON", "CI")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.update(HOME=str(tmp / "home"), XDG_CACHE_HOME=str(tmp / "home" / ".cache"),
               XDG_CONFIG_HOME=str(tmp / "home" / ".config"), PALETTELINK_BUNDLES=str(bundles),
               VENV=str(Path(sys.prefix)))
    (tmp / "home").mkdir()
    return env


def parse(stdout: str) -> dict[tuple[str, str], Counter[str]]:
    """(section, image) → class-name counts from the demo's human-readable output."""
    out: dict[tuple[str, str], Counter[str]] = {}
    section, current = "", None
    for line in stdout.splitlines():
        if line.startswith("== "):
            section = line.strip("= ").split(" (0 = finest)")[0]
        elif m := FRAME.match(line):
            current = out.setdefault((section, Path(m.group(1)).name), Counter())
        elif (m := BOX.match(line)) and current is not None:
            current[m.group(1)] += 1
    return out


@pytest.fixture(scope="module")
def demo(bundles_root: Path, tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess[str]:
    tmp = tmp_path_factory.mktemp("demo")
    root = tmp / "bundles"  # the session's fall bundle, linked; the demo builds vision-image beside it,
    root.mkdir()            # not in the shared root (other tests expect that root to hold one bundle)
    (root / "fall-yolov8").symlink_to(bundles_root / "fall-yolov8", target_is_directory=True)
    return subprocess.run(["bash", "scripts/demo.sh"], cwd=REPO, env=fresh_env(tmp, root),
                          capture_output=True, text=True, timeout=900)


def test_demo_runs_first_time_with_a_fresh_home(demo: subprocess.CompletedProcess[str]) -> None:
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "demo: done" in demo.stdout


def test_demo_palette_rows_name_the_reference_classes(demo: subprocess.CompletedProcess[str]) -> None:
    rows = parse(demo.stdout)
    fall = "fall detector (fall-yolov8)"
    base = f"{fall}, baseline codec, 8 bits per value"
    reference = {img: set(c) for (sec, img), c in rows.items() if sec == base}
    assert set(reference) == {"bus.jpg", "zidane.jpg"}, rows
    palette = {k: set(c) for k, c in rows.items() if k[0].startswith(f"{fall}, palette codec")}
    want = {f"{fall}, palette codec, level 0", f"{fall}, palette codec, level 2"}
    assert {sec for sec, _ in palette} >= want, rows
    for (section, img), classes in palette.items():
        assert classes == reference[img], f"{section} on {img}: {classes} vs uncompressed {reference[img]}"


def test_demo_runs_every_task_of_the_coco_stream(demo: subprocess.CompletedProcess[str]) -> None:
    rows = parse(demo.stdout)
    coco = rows[("COCO detection (vision-image), level 0 of the bundle's default codec", "bus.jpg")]
    assert coco["person"] >= 2, coco  # the bus: see test_tasks.py's xfail
    for task in ("segment", "landmarks", "pose", "preview"):
        assert any(sec.startswith(f"{task} (vision-image)") for sec, _ in rows), (task, sorted(rows))
    faces = rows[("landmarks (vision-image), level 0: faces and their 468 points", "astronaut.png")]
    assert faces["face"] == 1, faces
    assert "mask " in demo.stdout and "preview " in demo.stdout and " ERROR " not in demo.stdout
