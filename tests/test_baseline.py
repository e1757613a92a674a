"""Baseline codec: per-channel uniform quantisation + ANS, decoded bit-exactly from golden bytes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from palettelink import bitstream
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
    damaged_hash = bytearray(payload)
    off = 8 + 1 + len(bundle.id.encode())
    damaged_hash[off] ^= 0xFF
    with pytest.raises(InvalidStream, match="checksum"):  # damage in transit, caught by the CRC
        dec.decode(bytes(damaged_hash))
    other_hash = bitstream.pack(dataclasses.replace(bitstream.unpack(payload), table_hash=bytes(8)))
    with pytest.raises(BundleMismatch):  # a sound frame coded with other tables
        dec.decode(other_hash)


def test_inconsistent_baseline_frames_are_refused(bundle, images) -> None:  # noqa: ANN001
    """Sound containers whose contents contradict the codec: min > max, flags a baseline never sets,
    a layer missing."""
    dec = Decoder(bundle)
    payload = make_encoder(bundle, "baseline").encode(load_image(images[1]), 4).payload
    f = bitstream.unpack(payload)
    side = np.frombuffer(f.layers[0][:4], dtype="<f2")
    assert side[0] < side[1]
    swapped = side[::-1].astype("<f2").tobytes() + f.layers[0][4:]
    bad = [
        (dataclasses.replace(f, layers=(swapped, *f.layers[1:])), "min > max"),
        (dataclasses.replace(f, progressive=True), "whole"),
        (dataclasses.replace(f, codec_flags=1), "flags"),
        (dataclasses.replace(f, layers=f.layers[:-1]), "layers"),
    ]
    for frame, says in bad:
        with pytest.raises(InvalidStream, match=says):
            dec.decode(bitstream.pack(frame))
    assert dec.decode(payload).level == 4
