"""The container: what it writes it reads back, and every malformed input is one typed error."""

from __future__ import annotations

import struct

import pytest

from palettelink import bitstream
from palettelink.bitstream import Frame, pack, unpack
from palettelink.errors import InvalidStream


def make_frame(layers: tuple[bytes, ...] = (b"abc", b"", b"x" * 300)) -> Frame:
    return Frame(codec="palette", param=7, bundle_id="fall-yolov8/1", table_hash=bytes(range(8)),
                 image_size=(810, 1080), shapes=((32, 40, 40),), layers=layers, progressive=True)


def test_round_trip_keeps_every_field() -> None:
    f = make_frame()
    assert unpack(pack(f)) == f
    g = Frame(**{**f.__dict__, "codec_flags": 0x55})
    assert unpack(pack(g)) == g and unpack(pack(g)).progressive


def test_header_is_small() -> None:
    overhead = len(pack(make_frame(layers=(b"",)))) - 0
    assert overhead < 48, "per-frame header must stay cheap at low rates"


def test_bpp_counts_original_pixels() -> None:
    assert make_frame().bpp(1000) == pytest.approx(8000 / (810 * 1080))


@pytest.mark.parametrize("cut", [0, 3, 8, 12, 20, 30])
def test_truncated_header_is_invalid(cut: int) -> None:
    with pytest.raises(InvalidStream, match="truncated|holds no layer"):
        unpack(pack(make_frame())[:cut])


def test_truncated_layer_is_invalid_unless_allowed() -> None:
    data = pack(make_frame())
    with pytest.raises(InvalidStream, match="truncated"):
        unpack(data[:-10])
    part = unpack(data[:-10], allow_truncated_layers=True)
    assert part.truncated and part.layers == (b"abc", b"")


def test_wrong_magic() -> None:
    data = b"JUNK" + pack(make_frame())[4:]
    with pytest.raises(InvalidStream, match="magic"):
        unpack(data)


def test_unknown_version_and_codec() -> None:
    data = bytearray(pack(make_frame()))
    data[4] = 99
    with pytest.raises(InvalidStream, match="version"):
        unpack(bytes(data))
    data = bytearray(pack(make_frame()))
    data[5] = 200
    with pytest.raises(InvalidStream, match="codec"):
        unpack(bytes(data))


def test_trailing_junk() -> None:
    with pytest.raises(InvalidStream, match="trailing"):
        unpack(pack(make_frame()) + b"\x00")


def test_absurd_tensor_shape_is_refused_before_allocation() -> None:
    data = bytearray(pack(make_frame()))
    off = 8 + 1 + len(b"fall-yolov8/1") + 8 + 4 + 1
    data[off : off + 6] = struct.pack(">HHH", 65535, 65535, 65535)
    with pytest.raises(InvalidStream, match="absurd"):
        unpack(bytes(data))


def test_absurd_layer_length() -> None:
    f = make_frame(layers=(b"abc",))
    data = pack(f)[:-4] + b"\xff\xff\xff\xff\x7f" + b"abc"
    with pytest.raises(InvalidStream, match="truncated"):
        unpack(data)


def test_zero_image_size() -> None:
    data = bytearray(pack(make_frame()))
    off = 8 + 1 + len(b"fall-yolov8/1") + 8
    data[off : off + 4] = b"\x00\x00\x00\x00"
    with pytest.raises(InvalidStream, match="image size"):
        unpack(bytes(data))


def test_random_bytes_never_escape_as_other_errors() -> None:
    rng = __import__("random").Random(0)
    for _ in range(500):
        data = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 80)))
        if rng.random() < 0.5:
            data = bitstream.MAGIC + bytes([1]) + data
        try:
            unpack(data)
        except InvalidStream:
            pass


def test_pack_refuses_unrepresentable_frames() -> None:
    with pytest.raises(ValueError):
        pack(Frame("palette", 0, "x" * 65, bytes(8), (1, 1), ((1, 1, 1),), (b"",)))
    with pytest.raises(ValueError):
        pack(Frame("nope", 0, "x", bytes(8), (1, 1), ((1, 1, 1),), (b"",)))
