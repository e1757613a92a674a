"""PaletteEncoder / PaletteDecoder through a real (tiny) bundle: edge.onnx built by the project's own
``EdgeGraph`` (nearest entry + ancestor in ONNX), a stand-in decoder.onnx, a synthetic palette.

Covers the seams the edge and server use: ``make_encoder`` / ``Decoder``, ``analyse`` +
``level_sizes`` + ``encode_analysis`` (exact sizes), truncated streams, generative refinement,
typed errors.
"""

from __future__ import annotations

import numpy as np
import pytest

from palettelink import bitstream
from palettelink.bundle import Bundle, write_manifest
from palettelink.codecs import Decoder, make_encoder
from palettelink.codecs import palette as pc
from palettelink.errors import InvalidRequest, InvalidStream

SIZE, C, G, K0, LEVELS = 256, 16, 4, 64, 6
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's legacy ONNX exporter


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    import torch
    from torch import nn

    from palettelink.train import context, palette
    from palettelink.train.export import EdgeGraph

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("bundles") / "synth" / "1"
    folder.mkdir(parents=True)

    class Det:  # what EdgeGraph reads of a SplitDetector: layers, split, front()
        layers = [nn.AvgPool2d(16)]
        split = 0

        def front(self, x: torch.Tensor) -> list[torch.Tensor]:
            return [self.layers[0](x)]

    class Enc(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, C, 1)

        def forward(self, ts: list[torch.Tensor]) -> torch.Tensor:
            return self.conv(ts[0] * 4.0)

    class Dec(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(C, 8, 1)

        def forward(self, z: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
            return self.conv(z) + level.to(z.dtype)

    det, enc = Det(), Enc().eval()
    rng = np.random.default_rng(0)
    with torch.no_grad():  # latents of random smooth images, as the tiny encoder makes them
        imgs = torch.from_numpy(rng.random((24, 3, SIZE, SIZE)).astype(np.float32))
        imgs = nn.functional.interpolate(nn.functional.avg_pool2d(imgs, 64), size=SIZE, mode="bilinear")
        z = enc(det.front(imgs)).numpy()
    arrays = palette.build_palette(z, G, k0=K0, n_levels=LEVELS, seed=0)
    arrays.update(context.fit_context_tables(palette.index_maps(z, arrays), arrays))
    np.savez(folder / "palette.npz", **arrays)
    graph = EdgeGraph(det, enc, arrays).eval()
    with torch.no_grad():
        torch.onnx.export(graph, (torch.zeros(1, 3, SIZE, SIZE), torch.tensor(0)), str(folder / "edge.onnx"),
                          input_names=["images", "level"], output_names=["indices", "novelty"],
                          opset_version=17, dynamo=False)
        torch.onnx.export(Dec().eval(), (torch.zeros(1, C, 16, 16), torch.tensor(0)),
                          str(folder / "decoder.onnx"), input_names=["z", "level"], output_names=["t0"],
                          opset_version=17, dynamo=False)
    write_manifest(folder, {
        "name": "synth", "version": "1", "input_size": SIZE,
        "split": {"after_layer": 0, "tensors": [{"name": "t0", "layer": 0, "shape": [8, 16, 16]}]},
        "codecs": {"baseline": {"levels": list(range(2, 9))},
                   "palette": {"tables": "palette.npz", "latent": [C, 16, 16],
                               "levels": list(range(LEVELS))}},
        "tables": ["palette.npz"],
    })
    return Bundle.load(folder)


def _image(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3)).astype(np.float32)
    big = np.kron(small, np.ones((40, 40, 1)))  # blocky 240x320 image: smooth index maps
    return big.astype(np.uint8)


def test_encode_decode_every_level(tiny_bundle: Bundle) -> None:
    enc = make_encoder(tiny_bundle)
    assert isinstance(enc, pc.PaletteEncoder) and enc.levels() == list(range(LEVELS))
    dec = Decoder(tiny_bundle)
    rgb = _image(1)
    a = enc.analyse(rgb)
    assert a.indices.shape == (G, 16, 16) and a.image_size == (320, 240)
    for lv in range(LEVELS):
        e = enc.encode(rgb, lv)
        assert e.codec == "palette" and e.level == lv and e.image_size == (320, 240)
        d = dec.decode(e.payload)
        assert d.level == lv and not d.truncated and d.n_bytes == len(e.payload)
        assert d.tensors[0].shape == (1, 8, 16, 16)
        frame = bitstream.unpack(e.payload)
        assert frame.param == LEVELS - 1 and frame.progressive and len(frame.layers) == LEVELS - lv
        r = dec._get("palette").decode_indices(frame)  # type: ignore[attr-defined]
        assert np.array_equal(r.indices, enc.tables.ids_at(a.indices, lv))
        assert np.isfinite(d.tensors[0]).all()


def test_level_sizes_are_exact_and_monotone(tiny_bundle: Bundle) -> None:
    enc = pc.PaletteEncoder(tiny_bundle)
    a = enc.analyse(_image(2))
    sizes = enc.level_sizes(a)
    assert sorted(sizes) == list(range(LEVELS))
    for lv, n in sizes.items():
        assert len(enc.encode_analysis(a, lv).payload) == n
    assert all(sizes[t] > sizes[t + 1] for t in range(LEVELS - 1))
    full = enc.encode_analysis(a, 0).payload
    coarse = enc.encode_analysis(a, 3).payload
    assert bitstream.unpack(full).layers[:3] == bitstream.unpack(coarse).layers


def test_truncated_stream_decodes_its_complete_layers(tiny_bundle: Bundle) -> None:
    enc = pc.PaletteEncoder(tiny_bundle)
    e = enc.encode(_image(3), 0)
    d = Decoder(tiny_bundle).decode(e.payload[:-3])
    assert d.truncated and d.level == 1


def test_generative_refinement_option(tiny_bundle: Bundle) -> None:
    enc = pc.PaletteEncoder(tiny_bundle)
    e = enc.encode(_image(4), 3)
    frame = bitstream.unpack(e.payload)
    for mode in pc.GENERATE_MODES:
        dec = pc.PaletteDecoder(tiny_bundle, generate_to=0, mode=mode, seed=1)
        d = dec.decode_frame(frame, len(e.payload))
        assert d.level == 3 and d.timings_ms["generated_level"] == 0.0
        d2 = dec.decode_frame(frame, len(e.payload))
        assert all(np.array_equal(x, y) for x, y in zip(d.tensors, d2.tensors, strict=True))
    plain = pc.PaletteDecoder(tiny_bundle).decode_frame(frame, len(e.payload), generate_to=1)
    assert plain.timings_ms["generated_level"] == 1.0


def test_errors_are_typed(tiny_bundle: Bundle) -> None:
    enc = pc.PaletteEncoder(tiny_bundle)
    rgb = _image(5)
    with pytest.raises(InvalidRequest):
        enc.encode(rgb, LEVELS)
    with pytest.raises(InvalidRequest):
        enc.encode(rgb, -1)
    e = enc.encode(rgb, 0)
    frame = bitstream.unpack(e.payload)
    dec = pc.PaletteDecoder(tiny_bundle)
    bad_shape = bitstream.Frame(**{**frame.__dict__, "shapes": ((C + 1, 16, 16),)})
    bad_hw = bitstream.Frame(**{**frame.__dict__, "shapes": ((C, 20, 16),)})
    bad_param = bitstream.Frame(**{**frame.__dict__, "param": LEVELS})
    bad_layer = bitstream.Frame(**{**frame.__dict__, "layers": (frame.layers[0] + b"\x00\x00\x00\x01",
                                                                *frame.layers[1:])})
    for f in (bad_shape, bad_hw, bad_param, bad_layer):
        with pytest.raises(InvalidStream):
            dec.decode_frame(f, 0)
    with pytest.raises(InvalidStream):
        Decoder(tiny_bundle).decode(e.payload + b"junk")


def test_pure_functions_match_the_encoder(tiny_bundle: Bundle) -> None:
    enc = pc.PaletteEncoder(tiny_bundle)
    a = enc.analyse(_image(6))
    layers = pc.encode_levels(a.indices, enc.tables, 2)
    assert tuple(layers) == bitstream.unpack(enc.encode_analysis(a, 2).payload).layers


def test_inconsistent_palette_frames_are_refused(tiny_bundle: Bundle) -> None:
    """Sound containers whose layers contradict the bundle's palette are refused where they enter."""
    import dataclasses

    e = pc.PaletteEncoder(tiny_bundle).encode(_image(5), 0)
    f = bitstream.unpack(e.payload)
    dec = Decoder(tiny_bundle)
    bad = [
        (dataclasses.replace(f, layers=(b"",) * len(f.layers)), "empty"),
        (dataclasses.replace(f, layers=(b"",)), "empty"),
        (dataclasses.replace(f, layers=(*f.layers, f.layers[-1])), "declares 7 layers"),
        (dataclasses.replace(f, param=f.param - 1), "starts at level"),
        (dataclasses.replace(f, param=f.param + 1), "starts at level"),
        (dataclasses.replace(f, progressive=False), "progressive"),
        (dataclasses.replace(f, codec_flags=0x40), "flags"),
    ]
    for frame, says in bad:
        with pytest.raises(InvalidStream, match=says):
            dec.decode(bitstream.pack(frame))
    # a stream declaring more layers than levels is refused even when cut to fewer
    long = bitstream.pack(dataclasses.replace(f, layers=(*f.layers, f.layers[-1])))
    with pytest.raises(InvalidStream, match="declares 7 layers"):
        dec.decode(long[: len(e.payload) // 2])
    assert dec.decode(e.payload).level == 0


@pytest.fixture(scope="module")
def measured_bundle(tiny_bundle: Bundle, tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """The tiny bundle as the levels stage leaves a trained one: levels 1 and 4 not offered, level 3
    the default, a novelty threshold between a calm picture's novelty and a noisy one's."""
    import json
    import shutil

    folder = tmp_path_factory.mktemp("measured") / "synth" / "2"
    shutil.copytree(tiny_bundle.path, folder)
    enc = make_encoder(tiny_bundle)
    calm, novel = enc.analyse(_familiar(2)).novelty, enc.analyse(_image(1)).novelty
    assert calm is not None and novel is not None and novel > 2 * calm
    manifest = json.loads((folder / "manifest.json").read_text())
    entry = manifest["codecs"]["palette"]
    entry.update({"levels": [0, 2, 3, 5], "default_level": 3,
                  "novelty": {"threshold": float(np.sqrt(calm * novel))}})
    manifest.pop("files", None)
    write_manifest(folder, {k: v for k, v in manifest.items() if k not in ("table_hash",)})
    return Bundle.load(folder)


def _familiar(seed: int) -> np.ndarray:
    """Fine pixel noise: pooled by the tiny front to the grey the tiny palette was fitted on (the
    saturated blocks of ``_image`` are what it never saw)."""
    return np.random.default_rng(seed).integers(0, 256, (240, 320, 3)).astype(np.uint8)


def test_the_encoder_offers_the_measured_levels_and_defaults_to_the_measured_one(
        measured_bundle: Bundle) -> None:
    from palettelink.ratecontrol import LevelCoder, TargetBytes

    enc = make_encoder(measured_bundle)
    assert enc.levels() == [0, 2, 3, 5] and enc.default_level() == 3
    assert enc.encode(_image(1)).level == 3  # no level asked: the measured default, not 0
    a = enc.analyse(_image(1))
    assert sorted(enc.level_sizes(a)) == [0, 2, 3, 5]  # budgets choose among offered levels only
    big = max(enc.level_sizes(a).values())
    assert LevelCoder(enc, TargetBytes(big)).encode(_image(1)).encoded.level == 0


def test_a_novel_frame_falls_back_to_the_finest_offered_level_and_says_so(measured_bundle: Bundle) -> None:
    from palettelink.ratecontrol import FixedLevel, LevelCoder, TargetBytes

    enc = make_encoder(measured_bundle)
    calm = LevelCoder(enc, None).encode(_familiar(2)).encoded
    assert calm.level == 3 and calm.fallback is None and calm.novelty is not None
    novel = LevelCoder(enc, None).encode(_image(1)).encoded
    assert novel.level == 0 and novel.novelty > enc.novelty_threshold()
    assert novel.fallback and "novel frame" in novel.fallback and "level 3 → 0" in novel.fallback
    fixed = LevelCoder(enc, FixedLevel(5)).encode(_image(1)).encoded
    assert fixed.level == 0 and "level 5 → 0" in (fixed.fallback or "")
    # a byte budget is a hard limit: the record only says the frame is novel
    small = min(enc.level_sizes(enc.analyse(_image(1))).values())
    tight = LevelCoder(enc, TargetBytes(small)).encode(_image(1)).encoded
    assert tight.level == 5 and "budget allows no finer level" in (tight.fallback or "")
    dec = Decoder(measured_bundle).decode(novel.payload)
    assert dec.level == 0


def test_a_level_the_bundle_does_not_offer_is_an_expert_override_with_a_warning(
        measured_bundle: Bundle) -> None:
    from palettelink.ratecontrol import FixedLevel, LevelCoder

    enc = make_encoder(measured_bundle)
    coder = LevelCoder(enc, FixedLevel(1))  # level 1 exists in the palette but is not offered
    assert coder.fixed_warning and "not one the bundle offers" in coder.fixed_warning
    assert coder.encode(_familiar(2)).encoded.level == 1
    with pytest.raises(InvalidRequest, match="not offered"):
        LevelCoder(enc, FixedLevel(LEVELS))  # beyond the palette: refused
