"""Installs come from the committed lock: it is in sync with pyproject, every pin satisfies pyproject,
and the environment running the tests is exactly the lock (so CI tested what the lock says)."""

from __future__ import annotations

import importlib.metadata as md
from pathlib import Path

from helpers import REPO as ROOT
from helpers import load_script
from packaging.requirements import Requirement


def _lock():  # noqa: ANN202 - the scripts/lock.py module
    return load_script("lock")


def test_the_lock_was_made_from_todays_pyproject() -> None:
    lock = _lock()
    assert lock.read_header().get("dependencies-sha256") == lock.dependencies_hash(), (
        "pyproject.toml's dependencies changed since requirements.lock was written: "
        "run `python scripts/lock.py` and commit the lock")


def test_every_pin_is_exact_and_hashed() -> None:
    lines = [ln for ln in (ROOT / "requirements.lock").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert len(lines) > 50
    for ln in lines:
        assert "==" in ln and "--hash=sha256:" in ln, f"not an exact, hashed pin: {ln}"
        sha = ln.split("--hash=sha256:", 1)[1]
        assert len(sha) == 64 and all(c in "0123456789abcdef" for c in sha), ln


def test_every_pyproject_requirement_is_pinned_at_a_version_it_accepts() -> None:
    lock = _lock()
    pins = lock.read_pins()
    for extra, reqs in lock.pyproject_dependencies().items():
        for text in reqs:
            req = Requirement(text)
            name = lock.canonical(req.name)
            assert name in pins, f"{text} ({extra or 'runtime'}) is not in requirements.lock"
            version = pins[name][0]
            assert req.specifier.contains(version, prereleases=True), (
                f"requirements.lock pins {name}=={version}, pyproject asks {text}")


def test_the_running_environment_is_the_lock() -> None:
    lock = _lock()
    differ = []
    for name, (version, _) in lock.read_pins().items():
        try:
            have = md.version(name)
        except md.PackageNotFoundError:
            have = "missing"
        if have.split("+")[0] != version.split("+")[0]:
            differ.append(f"{name}: lock {version}, installed {have}")
    assert not differ, "the venv is not the lock (run bash scripts/setup.sh): " + "; ".join(differ)


def test_a_pyproject_edit_changes_the_recorded_hash(tmp_path: Path) -> None:
    lock = _lock()
    text = (ROOT / "pyproject.toml").read_text()
    edited = tmp_path / "pyproject.toml"
    edited.write_text(text.replace('"numpy>=1.26"', '"numpy>=1.27"'))
    assert lock.dependencies_hash(edited) != lock.dependencies_hash(ROOT / "pyproject.toml")


def test_the_edge_lock_is_the_full_lock_restricted_to_the_edge() -> None:
    lock = _lock()
    full, edge = lock.read_pins(lock.LOCK), lock.read_pins(lock.EDGE_LOCK)
    assert {"onnxruntime", "grpcio", "numpy", "constriction"} <= set(edge)
    assert "torch" not in edge
    assert all(full.get(n) == pin for n, pin in edge.items()), "requirements-edge.lock drifted from the lock"


def test_images_install_from_the_locks() -> None:
    server = (ROOT / "deploy" / "Dockerfile.server").read_text()
    edge = (ROOT / "deploy" / "Dockerfile.edge").read_text()
    assert "--require-hashes -r requirements.lock" in server
    assert "--require-hashes -r requirements-edge.lock" in edge.split("\nFROM ")[-1]


def test_what_the_lock_omits_is_named_with_a_reason_and_absent() -> None:
    """triton and opencv-python are declared by torch and ultralytics but never loaded by us; leaving
    them out keeps a fresh install about 1.2 GB smaller (CI once ran out of disk installing them)."""
    lock = _lock()
    pins = lock.read_pins()
    assert lock.OMIT, "nothing omitted: then drop the OMIT machinery"
    for name, why in lock.OMIT.items():
        assert name not in pins, f"{name} is omitted by scripts/lock.py but pinned in requirements.lock"
        assert len(why) > 20, f"say why {name} is omitted"
    asked = {lock.canonical(Requirement(r).name) for reqs in lock.pyproject_dependencies().values()
             for r in reqs}
    assert not asked & set(lock.OMIT), "pyproject asks for a distribution the lock omits"
    assert lock.read_header()["omitted (scripts/lock.py OMIT says why)"].split() == sorted(lock.OMIT)
