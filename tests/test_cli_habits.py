"""CLI habits of the three console scripts, run as real processes: ``--version``, a quiet exit when
stdout closes early, and a one-line pip hint (never a traceback) when an optional extra is missing.

Missing extras are simulated, not uninstalled: a ``sitecustomize`` on ``PYTHONPATH`` makes the
named modules absent (as if never installed), or a shadowing ``torch.py`` raises ImportError (a
broken install). Either way the real entry point runs in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import palettelink

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODULES = {"palettelink": "palettelink.cli", "palettelink-edge": "edge.client",
           "palettelink-server": "server.main"}

ABSENT = '''
import os, sys

_BLOCK = set(os.environ.get("PALETTELINK_TEST_ABSENT", "").split(","))


class _Absent:
    """Finds the blocked top-level modules first and says they do not exist."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.split(".")[0] in _BLOCK:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _Absent)
'''


def script(name: str) -> list[str]:
    exe = BIN / name
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", MODULES[name]]


def run(name: str, *args: str, absent: str = "", shim: Path | None = None, timeout: float = 120,
        stdout: int | None = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PALETTELINK_")}
    if shim is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(shim), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env["PALETTELINK_TEST_ABSENT"] = absent
    return subprocess.run(script(name) + list(args), stdout=stdout, stderr=subprocess.PIPE, text=True,
                          timeout=timeout, cwd=REPO, env=env)


@pytest.fixture
def absent_shim(tmp_path: Path) -> Path:
    d = tmp_path / "absent"
    d.mkdir()
    (d / "sitecustomize.py").write_text(ABSENT)
    return d


def one_line_hint(r: subprocess.CompletedProcess[str], extra: str) -> None:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert f"pip install 'palettelink[{extra}]'" in lines[0], lines[0]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_version_prints_prog_and_package_version(name: str) -> None:
    r = run(name, "--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{name} {palettelink.__version__}\n"


def test_package_version_is_the_pyproject_version() -> None:
    """Images are tagged with it (tests/test_deploy.py), so the two must not drift apart."""
    import server

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["version"] == palettelink.__version__ == server.__version__


@pytest.mark.parametrize("absent", ["torch", "fastapi", "uvicorn,prometheus_client"])
def test_server_without_its_extra_names_it(absent: str, absent_shim: Path, tmp_path: Path) -> None:
    r = run("palettelink-server", "--bundles", str(tmp_path), "--grpc-port", "0", "--http-port", "0",
            absent=absent, shim=absent_shim)
    one_line_hint(r, "server")
    assert absent.split(",")[0] in r.stderr
    assert "LISTENING" not in r.stdout, "it must not bind ports before saying what is missing"


@pytest.mark.parametrize("command", [["bench", "--images", "x.jpg"], ["train", "--bundle", "fall-yolov8"],
                                     ["build-bundle", "--out", "OUT"]])
def test_tools_without_the_train_extra_name_it(command: list[str], absent_shim: Path, tmp_path: Path) -> None:
    args = [str(tmp_path / "out") if a == "OUT" else a for a in command]
    r = run("palettelink", *args, absent="torch", shim=absent_shim)
    one_line_hint(r, "train")
    assert "torch" in r.stderr
    assert not (tmp_path / "out").exists()


def test_a_broken_dependency_is_a_hint_too(tmp_path: Path) -> None:
    """A ``torch`` that is there but does not import (shadowed or half-installed) is found by the
    cheap check; the real import fails later, and still gives the one-line hint."""
    shim = tmp_path / "broken"
    shim.mkdir()
    (shim / "torch.py").write_text('raise ImportError("libtorch_cpu.so: cannot open shared object file")\n')
    r = run("palettelink", "build-bundle", "--out", str(tmp_path / "out"), shim=shim)
    one_line_hint(r, "train")
    assert "libtorch_cpu.so" in r.stderr

    (shim / "fastapi.py").write_text('raise ImportError("fastapi is broken here")\n')
    r = run("palettelink-server", "--bundles", str(tmp_path), "--grpc-port", "0", "--http-port", "0",
            shim=shim)
    one_line_hint(r, "server")
    assert "fastapi is broken here" in r.stderr


def test_info_needs_no_extra(absent_shim: Path, tmp_path: Path) -> None:
    """The edge install keeps ``palettelink info``: it must not need torch or FastAPI."""
    r = run("palettelink", "info", "--bundles", str(tmp_path), "--json",
            absent="torch,torchvision,ultralytics,fastapi,uvicorn", shim=absent_shim)
    assert r.returncode == 0, r.stderr
    assert '"bundles": []' in r.stdout


def test_info_into_a_closed_pipe_exits_quietly(tmp_path: Path) -> None:
    """The reader is gone before the first write (what ``| head`` does a moment later): EPIPE on
    every write, deterministic. Exit 141 like any Unix tool, nothing on stderr."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        r = run("palettelink", "info", "--bundles", str(tmp_path), "--json", stdout=write_end)
    finally:
        os.close(write_end)
    assert r.returncode == 141, r.stderr
    assert r.stderr == "", r.stderr


def test_info_piped_into_head(tmp_path: Path) -> None:
    cmd = " ".join([*script("palettelink"), "info", "--bundles", str(tmp_path), "--json"])
    r = subprocess.run(["bash", "-c", f"{cmd} | head -1"], capture_output=True, text=True, timeout=60,
                       cwd=REPO)
    assert r.stdout == "{\n" and "Traceback" not in r.stderr, r.stderr
