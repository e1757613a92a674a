"""`palettelink train` runs end to end on a tiny image set, resumes from its cache, and its assets
install into a bundle whose palette codec round-trips a frame."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from palettelink.bitstream import unpack
from palettelink.bundle import find_bundle
from palettelink.codecs import Decoder, make_encoder
from palettelink.image import load_image

TINY = ["--tiny", "--max-images", "3", "--minutes", "0.1", "--finetune-minutes", "0.05", "--k0", "32",
        "--levels", "5"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, bundles_root: Path) -> tuple[Path, Path, str]:
    tmp = tmp_path_factory.mktemp("train")
    work, assets = tmp / "work", tmp / "assets" / "fall-yolov8"
    cmd = [sys.executable, "-m", "palettelink.cli", "train", "--bundles", str(bundles_root),
           "--work", str(work), "--out", str(assets), *TINY]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return work, assets, run.stdout


def test_every_stage_ran_and_assets_have_a_manifest(trained: tuple[Path, Path, str]) -> None:
    work, assets, out = trained
    for stage in ("bottleneck", "pseudolabels", "contrastive", "palette", "finetune", "context", "levels",
                  "ablations"):
        assert (work / stage / "done.json").is_file(), stage
    manifest = json.loads((assets / "manifest.json").read_text())
    for f in ("codec.json", "encoder.pt", "decoder.pt", "palette.npz", "elbow.png", "training.json"):
        assert f in manifest["files"], f
    codec = json.loads((assets / "codec.json").read_text())
    sizes = codec["level_sizes"]
    assert len(sizes) == 5 and all(a > b for a, b in zip(sizes, sizes[1:], strict=False))
    report = json.loads((assets / "training.json").read_text())
    assert sum(report["train_images"].values()) == 3
    assert "assets written" in out
    # what the codec measured about itself: offered levels, the default among them, novelty
    assert codec["levels"] == sorted(set(codec["levels"]) & set(range(5))) and codec["levels"]
    assert codec["default_level"] in codec["levels"]
    assert len(codec["level_report"]["levels"]) == 5 and "avif_q0" in codec["level_report"]
    assert codec["novelty"]["threshold"] >= codec["novelty"]["p50"] >= 0.0


def test_second_run_resumes_from_cache(trained: tuple[Path, Path, str], bundles_root: Path) -> None:
    work, assets, _ = trained
    cmd = [sys.executable, "-m", "palettelink.cli", "train", "--bundles", str(bundles_root),
           "--work", str(work), "--out", str(assets), *TINY]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "bottleneck:" not in run.stderr  # no training progress bar: the stage was skipped


def test_neck_weight_zero_trains_stage_one_only(tmp_path: Path, bundles_root: Path) -> None:
    """``--neck-weight 0``: the bottleneck is stage 1 alone (no neck term, no second stage folder), and
    the recipe and loss mix are recorded where a resume and an adaptation read them; ``--tensor-weights``
    replaces the measured per-tensor weights and ``--enc-width``/``--dec-width`` the networks' widths, all
    recorded in the codec; so are ``--class-weights`` (the class loss per detector class) and
    ``--palette-foreground`` (the weight of the teacher's detections in the palette hierarchy)."""
    work = tmp_path / "work"
    cmd = [sys.executable, "-m", "palettelink.cli", "train", "--bundles", str(bundles_root),
           "--work", str(work), "--out", str(tmp_path / "assets"), "--neck-weight", "0",
           "--tensor-weights", "0.25,0.5,3", "--enc-width", "48", "--dec-width", "96",
           "--class-weights", "1,3", "--palette-foreground", "8", "--paste-lying", "0.5", *TINY]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert not (work / "bottleneck-stage1").exists()
    recipe = json.loads((work / "bottleneck" / "done.json").read_text())["recipe"]
    assert recipe == "stage 1 only (no neck term)"
    assert json.loads((work / "bottleneck" / "config.json").read_text())["w_neck"] == 0.0
    codec = json.loads((tmp_path / "assets" / "codec.json").read_text())
    assert codec["bottleneck"]["w_neck"] == 0.0
    assert codec["bottleneck"]["tensor_weights"] == [0.25, 0.5, 3.0]
    assert (codec["bottleneck"]["enc_width"], codec["bottleneck"]["dec_width"]) == (48, 96)
    assert codec["bottleneck"]["class_weights"] == [1.0, 3.0]
    assert codec["config"]["palette_foreground"] == 8.0
    assert codec["config"]["paste_lying"] == 0.5
    assert json.loads((work / "palette" / "done.json").read_text())["foreground"] == 8.0


@pytest.mark.parametrize(("flag", "value", "says"), [("--tensor-weights", "1,x", "comma-separated numbers"),
                                                     ("--class-weights", "1,-2", "expected weights >= 0"),
                                                     ("--paste-lying", "1.5", "a probability in [0, 1]"),
                                                     ("--palette-foreground", "-1", "a number ≥ 0")])
def test_weights_must_be_numbers(tmp_path: Path, flag: str, value: str, says: str) -> None:
    cmd = [sys.executable, "-m", "palettelink.cli", "train", "--work", str(tmp_path), flag, value]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert says in run.stderr and "Traceback" not in run.stderr


def test_assets_install_and_code_a_frame(trained: tuple[Path, Path, str], tmp_path: Path, images) -> None:  # noqa: ANN001
    from palettelink.train.build_bundle import build_bundle

    _, assets, _ = trained
    dest = build_bundle(out_root=tmp_path, codec_assets=assets)
    bundle = find_bundle(str(dest))
    assert "palette" in bundle.codecs and "palette.npz" in bundle.manifest["tables"]
    codec = json.loads((assets / "codec.json").read_text())
    entry = bundle.codecs["palette"]
    assert entry["levels"] == codec["levels"] and entry["default_level"] == codec["default_level"]
    assert entry["novelty"]["threshold"] == codec["novelty"]["threshold"]
    enc, dec = make_encoder(bundle, "palette"), Decoder(bundle)
    assert enc.levels() == codec["levels"] and enc.default_level() == codec["default_level"]
    assert enc.analyse(load_image(images[0])).novelty is not None
    rgb = load_image(images[0])
    sizes = [len(enc.encode(rgb, t).payload) for t in range(5)]
    assert all(a > b for a, b in zip(sizes, sizes[1:], strict=False)), sizes
    d = dec.decode(enc.encode(rgb, 2).payload)
    assert d.codec == "palette" and d.level == 2
    assert [t.shape[1:] for t in d.tensors] == [t.shape for t in bundle.tensors]


def test_stream_says_which_entropy_model_it_uses(trained: tuple[Path, Path, str], tmp_path: Path,
                                                 images) -> None:  # noqa: ANN001
    """A static-table stream decodes on a server whose default is the context model, and costs more."""
    from palettelink.codecs.palette import PaletteDecoder, PaletteEncoder
    from palettelink.train.build_bundle import build_bundle

    _, assets, _ = trained
    bundle = find_bundle(str(build_bundle(out_root=tmp_path, codec_assets=assets)))
    rgb = load_image(images[1])
    static, context = PaletteEncoder(bundle, model="static"), PaletteEncoder(bundle)
    a, b = static.analyse(rgb), context.analyse(rgb)
    s_payload, c_payload = static.encode_analysis(a, 1).payload, context.encode_analysis(b, 1).payload
    dec = PaletteDecoder(bundle)
    rs, rc = dec.decode_indices(unpack(s_payload)), dec.decode_indices(unpack(c_payload))
    assert (rs.indices == rc.indices).all() and rs.level == rc.level == 1
    assert len(c_payload) < len(s_payload)


def test_ablation_rows_name_where_the_ceiling_sits(trained: tuple[Path, Path, str], tmp_path: Path,
                                                   images) -> None:  # noqa: ANN001
    """``bench --ablations z-unquantised,z-oracle``: the bottleneck alone, then one row per crossing tensor
    with that tensor sent exact (float16) beside the decoded others: z's bytes plus that tensor's."""
    from palettelink.cli import main
    from palettelink.train.build_bundle import build_bundle

    _, assets, _ = trained
    dest = build_bundle(out_root=tmp_path / "bundles", codec_assets=assets)
    bundle = find_bundle(str(dest))
    out = tmp_path / "bench"
    rc = main(["bench", "--bundle", str(dest), "--no-samples", "--images", str(images[0]),
               "--codec", "palette", "--levels", "0", "--ablations", "z-unquantised,z-oracle",
               "--assets", str(assets), "--anchors", "", "--out", str(out), "--no-progress"])
    assert rc == 0
    rows = {(r["method"], r["label"]): r for r in json.loads((out / "bench.json").read_text())["rows"]}
    z_bytes = rows[("z-unquantised", "f16")]["bytes_mean"]
    for t in bundle.tensors:
        row = rows[("z-oracle", f"{t.name} exact")]
        assert row["bytes_mean"] == z_bytes + 2 * int(np.prod(t.shape))
        assert 0.0 <= row["ap50"] <= 1.0
