"""Baseline codec: per-channel uniform quantisation + ANS, decoded bit-exactly from golden bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from palettelink.codecs import Decoder, make_encoder
from palettelink.codecs.baseline import decode_tensor, encode_tensor
from palettelink.errors import BundleMismatch, InvalidRequest, InvalidStream
from palettelink.image import load_image

GOLDEN = Path(__file__).parent / "golden" / "baseline"


def golden_tensor() -> np.ndarray:
    rng = np.random.default_rng(1234)
    return (rng.standard_normal((8, 12, 10)) * np.arange(1, 9)[:, None, None]).astype(np.float32)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_golden_layers_decode_exactly(bits: int, regenerate: bool) -> None:
    t = golden_tensor()
    layer = encode_tensor(t, bits)
    path_bin, path_npy = GOLDEN / f"b{bits}.bin", GOLDEN / f"b{bits}.npy"
    if regenerate:
        GOLDEN.mkdir(parents=True, exist_ok=True)
        path_bin.write_bytes(layer)
        np.save(path_npy, decode_tensor(layer, t.shape, bits))
    assert layer == path_bin.read_bytes(), "encoder output changed: the format is frozen"
    np.testing.assert_array_equal(decode_tensor(path_bin.read_bytes(), t.shape, bits), np.load(path_npy))


@pytest.mark.parametrize("bits", [8, 6, 4, 2])
def test_error_within_half_a_step(bits: int) -> None:
    t = golden_tensor()
    d = decode_tensor(encode_tensor(t, bits), t.shape, bits)[0]
    step = (t.reshape(8, -1).max(1) - t.reshape(8, -1).min(1)) / ((1 << bits) - 1)
    err = np.abs(d - t).reshape(8, -1).max(1)
    assert (err <= step * 0.5 + 0.02 * step + 1e-2).all()


def test_frame_round_trip_and_rate_falls_with_bits(bundle, images) -> None:  # noqa: ANN001
    enc, dec = make_encoder(bundle, "baseline"), Decoder(bundle)
    rgb = load_image(images[0])
    sizes = []
    for bits in (8, 4, 2):
        e = enc.encode(rgb, bits)
        d = dec.decode(e.payload)
        assert (d.codec, d.level, d.image_size) == ("baseline", bits, (810, 1080))
        assert [t.shape[1:] for t in d.tensors] == [t.shape for t in bundle.tensors]
        sizes.append(len(e.payload))
    assert sizes[0] > sizes[1] > sizes[2]


def test_bad_requests_and_streams(bundle, images) -> None:  # noqa: ANN001
    enc, dec = make_encoder(bundle, "baseline"), Decoder(bundle)
    with pytest.raises(InvalidRequest):
        enc.encode(load_image(images[0]), 9)
    payload = enc.encode(load_image(images[1]), 4).payload
    with pytest.raises(InvalidStream):
        dec.decode(payload[: len(payload) // 2])
    corrupted = bytearray(payload)
    corrupted[len(payload) // 2] ^= 0x55
    with pytest.raises(InvalidStream):
        dec.decode(bytes(corrupted))
    other_hash = bytearray(payload)
    off = 8 + 1 + len(bundle.id.encode())
    other_hash[off] ^= 0xFF
    with pytest.raises(BundleMismatch):
        dec.decode(bytes(other_hash))
