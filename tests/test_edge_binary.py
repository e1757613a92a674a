"""The one-file edge binary: built with PyInstaller in a Debian 11 root (glibc 2.31), it fetches its
bundle from a live server and streams bus.jpg (``scripts/check-edge-binary.sh``), needs no glibc newer
than 2.31 (``scripts/check-glibc-floor.py``, every ELF file it unpacks included) and is byte-identical
when built twice (``scripts/check-edge-reproducible.sh``). The builds take minutes (the build root,
once, about 10), so they run only with ``PALETTELINK_SLOW=1``; the glibc checker itself is tested here
on real ELF files and a one-file archive made in the test, quickly."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import sysconfig
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
FLOOR_CHECK = SCRIPTS / "check-glibc-floor.py"
BINARY = ROOT / "dist" / "palettelink-edge"
SLOW = pytest.mark.skipif(os.environ.get("PALETTELINK_SLOW") != "1", reason="minutes: set PALETTELINK_SLOW=1")


def floor_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(FLOOR_CHECK), *args], capture_output=True, text=True,
                          timeout=300)


def small_elf_files() -> list[Path]:
    """Two dynamically linked ELF files every Linux machine with this Python has: a program, a module."""
    true = Path(shutil.which("true") or "/bin/true").resolve()
    dynload = Path(sysconfig.get_config_var("DESTSHARED"))  # the stdlib's extension modules
    modules = sorted(dynload.glob("_socket*.so")) or sorted(dynload.glob("*.so"))
    assert modules, f"no extension module in {dynload}"
    return [true, modules[0]]


def readelf_glibc(path: Path) -> str | None:
    """The newest GLIBC_x.y in ``readelf -V``'s version-needs section, the reference for the checker."""
    out = subprocess.run(["readelf", "-V", "-W", str(path)], capture_output=True, text=True).stdout
    needs = out.split("Version needs section", 1)[1] if "Version needs section" in out else ""
    versions = {m for m in re.findall(r"Name: GLIBC_([0-9.]+)", needs)}
    return max(versions, key=lambda v: tuple(map(int, v.split(".")))) if versions else None


def onefile(path: Path, bootloader: bytes, members: list[tuple[str, bytes, str]]) -> Path:
    """A bootloader with a PyInstaller CArchive appended: members, a table of contents, the cookie (the
    layout PyInstaller's ``archive/readers.py`` reads: ``!IIIIBc`` + padded name, ``!8sIIII64s``)."""
    blobs, toc = b"", b""
    for name, data, typecode in members:
        packed = zlib.compress(data)
        raw = name.encode() + b"\0"
        raw += b"\0" * (-(len(raw) + 18) % 16)
        toc += struct.pack("!IIIIBc", 18 + len(raw), len(blobs), len(packed), len(data), 1,
                           typecode.encode()) + raw
        blobs += packed
    cookie_len = struct.calcsize("!8sIIII64s")
    pkg_len = len(blobs) + len(toc) + cookie_len
    cookie = struct.pack("!8sIIII64s", b"MEI\014\013\012\013\016", pkg_len, len(blobs), len(toc), 311,
                         b"libpython3.11.so.1.0")
    path.write_bytes(bootloader + blobs + toc + cookie)
    path.chmod(0o755)
    return path


def needing_glibc_9(elf: bytes) -> bytes:
    """The ELF image with its first required GLIBC version renamed 9.9...: a library "built on glibc 9"."""
    return re.sub(rb"GLIBC_2\.[0-9.]+\0", lambda m: re.sub(rb"[0-9]", b"9", m.group(0)), elf, count=1)


def test_glibc_check_reads_version_needs_like_readelf():
    if not shutil.which("readelf"):
        pytest.skip("no readelf (binutils) to compare with")
    files = small_elf_files()
    proc = floor_check("--json", "--floor", "99", *map(str, files))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["elf_files"] == 2 and report["ok"]
    for row, path in zip(report["files"], files, strict=True):
        assert row["glibc"] == readelf_glibc(path), row
        assert row["glibc"] and row["glibc_from"].startswith(("libc.so", "libm.so", "libpthread", "libdl"))


def test_glibc_check_unpacks_a_onefile_binary_and_names_the_file_above_the_floor(tmp_path):
    true, module = small_elf_files()
    inner = needing_glibc_9(module.read_bytes())
    toy = onefile(tmp_path / "toy", true.read_bytes(),
                  [("python3.11/lib-dynload/_inner.so", inner, "b"), ("README.txt", b"not ELF", "x"),
                   ("pyi-runtime-tmpdir /tmp", b"", "o")])
    proc = floor_check("--floor", "9", str(toy))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert re.search(r"TOO NEW GLIBC_9\.[0-9.]+ \(libc\.so\.6\)  \S*toy!python3\.11/lib-dynload/_inner\.so",
                     proc.stdout), proc.stdout
    assert "toy!python3.11/lib-dynload/_inner.so needs GLIBC_9." in proc.stderr
    assert "2 ELF file(s)" in proc.stdout and "floor 9: 1 file(s) above the floor" in proc.stdout
    report = json.loads(floor_check("--json", "--floor", "9", str(toy)).stdout)
    assert report["newest_glibc"].startswith("9.") and report["newest_glibc_file"].endswith("!python3.11/"
                                                                                           "lib-dynload/_inner.so")
    assert [r["too_new"] != {} for r in report["files"]] == [False, True]
    # A floor above both: exit 0.
    assert floor_check("--floor", "10", str(toy)).returncode == 0


def test_glibc_check_usage_errors(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an ELF file")
    for args, message in ((["--floor", "2.31", str(text)], "not an ELF file"),
                          (["--floor", "two", str(text)], "expected a version like 2.31"),
                          ([str(tmp_path / "missing")], "missing")):
        proc = floor_check(*args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_build_script_builds_on_the_glibc_floor_and_checks_it():
    text = (SCRIPTS / "build-edge-binary.sh").read_text()
    assert "FLOOR=2.31" in text and "SUITE=bullseye" in text  # Debian 11 ships glibc 2.31
    assert 'check-glibc-floor.py" --floor "$FLOOR"' in text
    for setting in ("PYTHONHASHSEED=0", "SOURCE_DATE_EPOCH=", "TZ=UTC"):
        assert setting in text
    readme = (ROOT / "README.md").read_text()
    for needle in ("glibc 2.31", "check-glibc-floor.py", "check-edge-reproducible.sh"):
        assert needle in readme


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_build_scripts_pass_shellcheck():
    names = ("build-edge-binary.sh", "check-edge-reproducible.sh")
    proc = subprocess.run(["shellcheck", *(str(SCRIPTS / n) for n in names)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_built_binary_meets_the_glibc_floor():
    if not BINARY.is_file():
        pytest.skip("dist/palettelink-edge not built (sudo bash scripts/build-edge-binary.sh)")
    proc = floor_check("--floor", "2.31", str(BINARY))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


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


@SLOW
def test_binary_is_reproducible_and_meets_the_glibc_floor():
    if os.geteuid() != 0:
        pytest.skip("the build needs root (debootstrap, chroot)")
    proc = subprocess.run(["bash", str(SCRIPTS / "check-edge-reproducible.sh")], cwd=ROOT,
                          capture_output=True, text=True, timeout=3600)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["identical"], proc.stdout[-4000:]
    assert tuple(map(int, report["newest_glibc"].split("."))) <= (2, 31), report
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


@SLOW
def test_binary_fetches_and_streams():
    if not (ROOT / "bundles" / "fall-yolov8").is_dir():
        pytest.skip("bundles/fall-yolov8 not built")
    if os.geteuid() != 0:
        pytest.skip("the build needs root (debootstrap, chroot)")
    proc = subprocess.run(["bash", str(SCRIPTS / "check-edge-binary.sh")], cwd=ROOT,
                          capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["size_bytes"] > 1_000_000
    assert "box(es)" in proc.stdout
    assert report["ran_on_glibc"] == "2.31"  # the same file fetched and streamed in the Debian 11 root
