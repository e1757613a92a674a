"""Bundles: manifests verify every file, and names resolve to the newest version."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from palettelink.bundle import Bundle, find_bundle, manifest_sha256_of, write_manifest
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


def _edit(d: Path, change) -> None:  # noqa: ANN001 - change(manifest dict) edits it in place
    m = json.loads((d / "manifest.json").read_text())
    change(m)
    (d / "manifest.json").write_text(json.dumps(m, indent=2))


@pytest.mark.parametrize("what", ["class names swapped", "input size", "a codec level", "a file's hash"])
def test_an_edited_manifest_is_refused_like_an_edited_file(tmp_path: Path, what: str) -> None:
    """The whole manifest is covered by manifest_sha256 (what write_manifest writes), not only the
    files it lists: swapping class names or changing the input size is refused at load, in one line."""
    d = make_bundle(tmp_path, "1")
    with open(d / "manifest.json", "a") as f:
        f.write("\n")  # formatting is not content
    _edit(d, lambda m: m.update(class_names=["Normal", "Fall"], input_size=640))
    _edit(d, lambda m: m.update(manifest_sha256=manifest_sha256_of(m)))  # the writer's own hash
    assert Bundle.load(d).class_names == ["Normal", "Fall"]
    change = {"class names swapped": lambda m: m.update(class_names=["Fall", "Normal"]),
              "input size": lambda m: m.update(input_size=320),
              "a codec level": lambda m: m.update(codecs={"baseline": {"levels": [2, 3]}}),
              "a file's hash": lambda m: m["files"].update({"palette.npz": "0" * 64})}[what]
    _edit(d, change)
    with pytest.raises(BundleError) as e:
        Bundle.load(d)
    msg = str(e.value)
    assert "manifest.json was edited since the bundle was written" in msg and "\n" not in msg
    assert str(d) in msg and "palettelink build-bundle" in msg
    with pytest.raises(BundleError, match="was edited"):
        Bundle.load(d, side="edge")
    assert Bundle.load(d, verify=False).id == "toy/1"  # --no-verify skips every check alike


def test_a_manifest_without_its_hash_loads_with_a_warning(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """Bundles written before manifests were hashed still load (rebuild them to cover the manifest)."""
    d = make_bundle(tmp_path, "1")
    _edit(d, lambda m: m.pop("manifest_sha256"))
    with caplog.at_level("WARNING", logger="palettelink.bundle"):
        assert Bundle.load(d).id == "toy/1"
    assert "has no manifest_sha256" in caplog.text and "palettelink build-bundle" in caplog.text


def test_the_writer_hashes_the_whole_manifest(tmp_path: Path) -> None:
    d = make_bundle(tmp_path, "1")
    m = json.loads((d / "manifest.json").read_text())
    assert m["manifest_sha256"] == manifest_sha256_of(m) and len(m["manifest_sha256"]) == 64
    # Rewritten from a loaded manifest (as the trainers do): the stale hash is replaced, not kept.
    write_manifest(d, dict(m, class_names=["a"]))
    m2 = json.loads((d / "manifest.json").read_text())
    assert m2["manifest_sha256"] == manifest_sha256_of(m2) != m["manifest_sha256"]
    assert Bundle.load(d).class_names == ["a"]


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


def test_a_build_in_progress_or_left_behind_is_no_version(tmp_path: Path) -> None:
    """atomic_write_folder writes ``.1.xxxx`` beside the bundle and renames it; a killed build-bundle
    leaves it, manifest and all. It must never be found as the newest version, nor listed."""
    from palettelink.bundle import list_bundles

    make_bundle(tmp_path, "1")
    left = make_bundle(tmp_path, ".1.brplt94x")
    assert left.is_dir() and find_bundle("toy", tmp_path).version == "1"
    assert list_bundles(tmp_path) == [tmp_path / "toy" / "1"]


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
    m["manifest_sha256"] = manifest_sha256_of(m)  # a consistent manifest, only wrong about its sides
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="ghost.onnx"):
        Bundle.load(d, side="edge")
    with pytest.raises(ValueError, match="side"):
        Bundle.load(d, side="both")
