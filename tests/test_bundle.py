"""Bundles: manifests verify every file, and names resolve to the newest version."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from palettelink.bundle import Bundle, find_bundle, write_manifest
from palettelink.errors import BundleError, BundleNotFound


def make_bundle(root: Path, version: str, payload: bytes = b"tables") -> Path:
    d = root / "toy" / version
    d.mkdir(parents=True)
    (d / "palette.npz").write_bytes(payload)
    split = {"after_layer": 1, "tensors": [{"name": "t1", "layer": 1, "shape": [4, 2, 2]}]}
    write_manifest(d, {"name": "toy", "version": version, "tables": ["palette.npz"], "split": split})
    return d


def test_manifest_lists_sha256_and_table_hash(tmp_path: Path) -> None:
    d = make_bundle(tmp_path, "1")
    m = json.loads((d / "manifest.json").read_text())
    assert set(m["files"]) == {"palette.npz"} and len(m["table_hash"]) == 64
    assert Bundle.load(d).table_hash == bytes.fromhex(m["table_hash"])[:8]


def test_tampered_file_is_refused(tmp_path: Path) -> None:
    d = make_bundle(tmp_path, "1")
    (d / "palette.npz").write_bytes(b"other")
    with pytest.raises(BundleError, match="sha256"):
        Bundle.load(d)


def test_missing_file_is_refused(tmp_path: Path) -> None:
    d = make_bundle(tmp_path, "1")
    (d / "palette.npz").unlink()
    with pytest.raises(BundleError, match="missing"):
        Bundle.load(d)


def test_tables_change_the_hash(tmp_path: Path) -> None:
    a = Bundle.load(make_bundle(tmp_path / "a", "1", b"one"))
    b = Bundle.load(make_bundle(tmp_path / "b", "1", b"two"))
    assert a.table_hash != b.table_hash


def test_find_picks_highest_numeric_version(tmp_path: Path) -> None:
    for v in ("2", "10", "9"):
        make_bundle(tmp_path, v)
    assert find_bundle("toy", tmp_path).version == "10"
    assert find_bundle("toy/9", tmp_path).version == "9"
    assert find_bundle(str(tmp_path / "toy" / "2")).version == "2"


def test_unknown_bundle_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(BundleNotFound, match="build-bundle"):
        find_bundle("nope", tmp_path)


def test_real_bundle_verifies(bundle) -> None:  # noqa: ANN001
    copy = Path(shutil.copytree(bundle.path, bundle.path.parent / "copy"))
    try:
        assert Bundle.load(copy).id == bundle.id
    finally:
        shutil.rmtree(copy)
