"""edge.onnx / decoder.onnx match their torch references; installing assets checks what they were
trained for. Small random models and a small random palette: this tests the plumbing, not quality."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from palettelink.bundle import Bundle, sha256_file, write_manifest
from palettelink.errors import BundleError
from palettelink.image import letterbox, load_image
from palettelink.train.bottleneck import BottleneckConfig, Decoder, Encoder
from palettelink.train.export import EdgeGraph, export_decoder_onnx, export_edge_onnx, install_palette_codec
from palettelink.train.levels import novelty_of

SIZE = 320
LEVELS = (32, 8, 2)
GROUPS = np.array([0, 8, 16, 24, 32], dtype=np.int32)


def _session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def models(detector):  # noqa: ANN001, ANN201
    torch.manual_seed(0)
    cfg = BottleneckConfig.for_detector(detector, SIZE, n_levels=len(LEVELS))
    return Encoder(cfg).eval(), Decoder(cfg).eval(), cfg


@pytest.fixture(scope="module")
def inputs(images) -> list[np.ndarray]:  # noqa: ANN001
    return [letterbox(load_image(p), SIZE)[0] for p in images]


def _palette(detector, enc: Encoder, inputs: list[np.ndarray], embed_group: int | None = 1) -> dict:  # noqa: ANN001
    """K0 = 32 entries per group drawn from real z vectors (+ noise), nested ancestors 32 → 8 → 2;
    group ``embed_group`` searches in a random linear embedding (the contrastive variant)."""
    rng = np.random.default_rng(0)
    with torch.inference_mode():
        z = np.concatenate([enc(detector.front(torch.from_numpy(x))).numpy() for x in inputs])
    vecs = z.transpose(0, 2, 3, 1).reshape(-1, z.shape[1])
    t: dict[str, np.ndarray] = {"groups": GROUPS, "level_sizes": np.array(LEVELS, np.int32)}
    for g, (a, b) in enumerate(zip(GROUPS[:-1], GROUPS[1:], strict=True)):
        pick = vecs[rng.choice(len(vecs), LEVELS[0], replace=False), a:b]
        pick = pick + rng.normal(0, 0.01, pick.shape)
        anc = np.stack([np.arange(32), np.arange(32) % 8, (np.arange(32) % 8) % 2]).astype(np.int32)
        t[f"g{g}_ancestor"] = anc
        for lv, k in enumerate(LEVELS):
            t[f"g{g}_centroids_{lv}"] = rng.normal(size=(k, b - a)).astype(np.float32)
        if g == embed_group:
            w = rng.normal(size=(6, b - a)).astype(np.float32)
            bias = rng.normal(size=6).astype(np.float32)
            t[f"g{g}_embed_w"], t[f"g{g}_embed_b"] = w, bias
            t[f"g{g}_search"] = (pick @ w.T + bias).astype(np.float32)
        else:
            t[f"g{g}_search"] = pick.astype(np.float32)
    return t


def test_edge_onnx_indices_equal_torch(detector, models, inputs, tmp_path: Path) -> None:  # noqa: ANN001
    enc, _, _ = models
    tables = _palette(detector, enc, inputs)
    path = export_edge_onnx(detector, enc, tables, tmp_path / "edge.onnx", SIZE)
    sess = _session(path)
    assert [i.name for i in sess.get_inputs()] == ["images", "level"]
    ref = EdgeGraph(detector, enc, tables).eval()
    h = SIZE // 16
    for x in inputs:
        with torch.inference_mode():
            z = enc(detector.front(torch.from_numpy(x)))
            nearest, novelty = ref.nearest(z)
            finest = torch.stack(nearest).numpy()
        # novelty: the graph's value is the numpy twin's, the calibration's unit
        want_novelty = novelty_of(z.numpy(), tables)[0]
        assert float(novelty) == pytest.approx(want_novelty, rel=1e-4)
        for level in range(len(LEVELS)):
            lv = np.array(level, dtype=np.int64)
            got, got_novelty = sess.run(None, {"images": x, "level": lv})
            assert float(got_novelty) == pytest.approx(want_novelty, rel=1e-3, abs=1e-6)
            with torch.inference_mode():
                want = ref(torch.from_numpy(x), torch.from_numpy(lv))[0].numpy()
            assert got.dtype == np.int32 and got.shape == (4, h, h)
            assert (got == want).all(), f"level {level}: {(got != want).sum()} of {got.size} indices differ"
            for g in range(4):  # level t = ancestor of the finest entry
                anc = tables[f"g{g}_ancestor"][level]
                assert (got[g].ravel() == anc[finest[g]]).all()
                assert got[g].max() < LEVELS[level]
        assert len(np.unique(finest)) > 4  # the palette is really used


def test_decoder_onnx_matches_torch(models, tmp_path: Path) -> None:  # noqa: ANN001
    _, dec, cfg = models
    with torch.no_grad():  # give the level embedding + FiLM something to do
        for p in dec.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    path = export_decoder_onnx(dec, tmp_path / "decoder.onnx", cfg, names=("t4", "t6", "t9"))
    sess = _session(path)
    assert [o.name for o in sess.get_outputs()] == ["t4", "t6", "t9"]
    rng = np.random.default_rng(1)
    worst = 0.0
    z = rng.normal(size=(1, cfg.z_channels, 8, 8)).astype(np.float32)
    a, b = (sess.run(None, {"z": z, "level": np.array(lv, dtype=np.int64)})[2] for lv in (-1, 0))
    assert np.abs(a - b).max() > 1e-3  # the level is a real input, not a constant of the trace
    for h, level in ((SIZE // 16, -1), (SIZE // 16, 1), (12, 0), (10, 7)):  # 7 clamps to n_levels - 1
        z = rng.normal(size=(1, cfg.z_channels, h, h)).astype(np.float32)
        got = sess.run(None, {"z": z, "level": np.array(level, dtype=np.int64)})
        with torch.inference_mode():
            want = [t.numpy() for t in dec(torch.from_numpy(z), level)]
        for g, w, s in zip(got, want, cfg.in_strides, strict=True):
            assert g.shape == w.shape == (1, w.shape[1], h * 16 // s, h * 16 // s)
            worst = max(worst, float(np.abs(g - w).max() / (np.abs(w).max() + 1e-6)))
    print(f"decoder.onnx vs torch: max abs diff / max |t| = {worst:.2e}")
    assert worst < 1e-4


def _write_assets(folder: Path, enc: Encoder, dec: Decoder, cfg: BottleneckConfig, tables: dict,
                  detector_sha: str, split: dict) -> Path:
    folder.mkdir(parents=True)
    torch.save(enc.state_dict(), folder / "encoder.pt")
    torch.save(dec.state_dict(), folder / "decoder.pt")
    np.savez(folder / "palette.npz", **tables)
    codec = {"latent_channels": cfg.z_channels, "stride": 16, "groups": 4, "level_sizes": list(LEVELS),
             "levels": list(range(len(LEVELS))), "mean_bits": [3.0, 2.0, 1.0], "bottleneck": cfg.to_dict()}
    (folder / "codec.json").write_text(json.dumps(codec))
    write_manifest(folder, {"name": "test-palette", "version": "1", "split": split,
                            "detector_sha256": detector_sha, "tables": ["palette.npz"]})
    return folder


def test_install_palette_codec(detector, bundle, models, inputs, images,  # noqa: ANN001
                               tmp_path: Path) -> None:
    enc, dec, cfg = models
    tables = _palette(detector, enc, inputs, embed_group=None)
    sha = bundle.manifest["source"]["sha256"]
    assets = _write_assets(tmp_path / "assets", enc, dec, cfg, tables, sha, bundle.manifest["split"])

    dest = tmp_path / "bundle"
    shutil.copytree(bundle.path, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    entry = install_palette_codec(detector, assets, dest, manifest)
    write_manifest(dest, manifest)
    b = Bundle.load(dest)
    assert b.has_file("edge.onnx") and b.has_file("decoder.onnx") and b.has_file("palette.npz")
    assert "palette.npz" in b.manifest["tables"]
    assert b.codecs["palette"] == entry
    assert entry["levels"] == [0, 1, 2] and entry["level_sizes"] == list(LEVELS)
    assert b.table_hash_hex != bundle.table_hash_hex  # the palette tables are part of the stream contract
    assert sha256_file(dest / "palette.npz") == sha256_file(assets / "palette.npz")
    sess = _session(dest / "edge.onnx")
    x = letterbox(load_image(images[0]), b.input_size)[0]
    idx, novelty = sess.run(None, {"images": x, "level": np.array(0, dtype=np.int64)})
    assert np.asarray(novelty).shape == () and float(novelty) >= 0.0
    assert idx.shape == (4, b.input_size // 16, b.input_size // 16)
    outs = [o.name for o in _session(dest / "decoder.onnx").get_outputs()]
    assert outs == b.manifest["front"]["outputs"]

    # installing twice does not list the table twice
    install_palette_codec(detector, assets, dest, manifest)
    assert manifest["tables"].count("palette.npz") == 1


def test_install_refuses_other_weights_and_tampering(detector, bundle, models, inputs,  # noqa: ANN001
                                                     tmp_path: Path) -> None:
    enc, dec, cfg = models
    tables = _palette(detector, enc, inputs, embed_group=None)
    manifest = json.loads((bundle.path / "manifest.json").read_text())
    wrong = _write_assets(tmp_path / "wrong", enc, dec, cfg, tables, "0" * 64, bundle.manifest["split"])
    with pytest.raises(BundleError, match="trained for detector weights"):
        install_palette_codec(detector, wrong, tmp_path, dict(manifest))

    good = _write_assets(tmp_path / "good", enc, dec, cfg, tables, bundle.manifest["source"]["sha256"],
                         bundle.manifest["split"])
    (good / "codec.json").write_text((good / "codec.json").read_text() + " ")
    with pytest.raises(BundleError, match="codec.json does not match its sha256"):
        install_palette_codec(detector, good, tmp_path, dict(manifest))
    assert not (tmp_path / "edge.onnx").exists()
