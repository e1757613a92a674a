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


# -- sides: the edge part verifies (and loads) on its own ----------------------------------------


def make_sided_bundle(root: Path) -> Path:
    d = root / "toy" / "1"
    d.mkdir(parents=True)
    for name, data in (("front.onnx", b"front"), ("palette.npz", b"tables"), ("model.pt", b"tail")):
        (d / name).write_bytes(data)
    split = {"after_layer": 1, "tensors": [{"name": "t1", "layer": 1, "shape": [4, 2, 2]}]}
    write_manifest(d, {"name": "toy", "version": "1", "tables": ["palette.npz"], "split": split,
                       "front": {"file": "front.onnx"}, "sides": {"edge": ["front.onnx", "palette.npz"]}})
    return d


def test_sides_are_recorded_and_do_not_change_the_table_hash(tmp_path: Path) -> None:
    from palettelink.bundle import sides_of, table_hash_of

    d = make_sided_bundle(tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    assert m["sides"] == {"edge": ["front.onnx", "palette.npz"], "server": ["model.pt"]}
    legacy = {k: v for k, v in m.items() if k != "sides"}
    assert table_hash_of(legacy) == m["table_hash"]  # the stream header names the same tables
    assert sides_of(legacy) == m["sides"]  # derived for manifests written before sides existed


def test_edge_side_loads_without_the_server_files(tmp_path: Path) -> None:
    d = make_sided_bundle(tmp_path)
    (d / "model.pt").unlink()
    with pytest.raises(BundleError, match="missing model.pt"):
        Bundle.load(d)
    b = Bundle.load(d, side="edge")
    assert b.side == "edge" and b.file("front.onnx") == d / "front.onnx"
    assert set(b.edge_files) == {"front.onnx", "palette.npz"}
    assert not b.has_file("model.pt")
    with pytest.raises(BundleError, match="server part"):
        b.file("model.pt")
    assert find_bundle("toy", tmp_path, side="edge").side == "edge"


def test_edge_side_still_refuses_a_tampered_edge_file(tmp_path: Path) -> None:
    d = make_sided_bundle(tmp_path)
    (d / "model.pt").write_bytes(b"changed")  # not the edge's business
    assert Bundle.load(d, side="edge").id == "toy/1"
    (d / "front.onnx").write_bytes(b"changed")
    with pytest.raises(BundleError, match="front.onnx does not match"):
        Bundle.load(d, side="edge")


def test_edge_side_naming_an_unlisted_file_is_refused(tmp_path: Path) -> None:
    d = make_sided_bundle(tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    m["sides"]["edge"].append("ghost.onnx")
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="ghost.onnx"):
        Bundle.load(d, side="edge")
    with pytest.raises(ValueError, match="side"):
        Bundle.load(d, side="both")
