"""The container: what it writes it reads back, and every malformed input is one typed error."""

from __future__ import annotations

import dataclasses
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from palettelink import bitstream, codecs
from palettelink.bitstream import Frame, pack, unpack
from palettelink.errors import InvalidStream


def make_frame(layers: tuple[bytes, ...] = (b"abc", b"", b"x" * 300)) -> Frame:
    return Frame(codec_id=2, param=7, bundle_id="fall-yolov8/1", table_hash=bytes(range(8)),
                 image_size=(810, 1080), shapes=((32, 40, 40),), layers=layers, progressive=True)


def test_round_trip_keeps_every_field() -> None:
    f = make_frame()
    assert unpack(pack(f)) == f
    g = Frame(**{**f.__dict__, "codec_flags": 0x55})
    assert unpack(pack(g)) == g and unpack(pack(g)).progressive


def test_header_is_small() -> None:
    overhead = len(pack(make_frame(layers=(b"",)))) - 0
    assert overhead < 48, "per-frame header must stay cheap at low rates"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 20000), min_size=1, max_size=9), st.text(min_size=1, max_size=20),
       st.integers(1, 3))
def test_packed_size_is_the_packed_length(lengths: list[int], name: str, n_shapes: int) -> None:
    """Rate control sizes levels with packed_size; it must be pack's length exactly."""
    if not 0 < len(name.encode()) <= bitstream.MAX_BUNDLE_ID:
        return
    f = dataclasses.replace(make_frame(tuple(b"q" * n for n in lengths)), bundle_id=name,
                            shapes=((32, 40, 40),) * n_shapes)
    assert bitstream.packed_size(f) == len(pack(f))


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
    data[5] = 0
    with pytest.raises(InvalidStream, match="codec"):
        unpack(bytes(data))
    odd = pack(dataclasses.replace(make_frame(), codec_id=200))  # the container carries any other id,
    assert unpack(odd).codec_id == 200
    with pytest.raises(InvalidStream, match="codec"):  # the registry refuses one no codec registered
        codecs.unpack(odd)


def test_trailing_junk() -> None:
    with pytest.raises(InvalidStream, match="trailing"):
        unpack(pack(make_frame()) + b"\x00")


def test_absurd_tensor_shape_is_refused_before_allocation() -> None:
    data = bytearray(pack(make_frame()))
    off = 8 + 1 + len(b"fall-yolov8/1") + 8 + 4 + 1
    data[off : off + 6] = struct.pack(">HHH", 65535, 65535, 65535)
    with pytest.raises(InvalidStream, match="absurd"):
        unpack(bytes(data))


def _header_end(data: bytes, n_layers: int) -> int:
    """Offset of the first layer's bytes (the header ends with one uvarint length per layer)."""
    pos = 8 + 1 + data[8] + 8 + 4
    pos += 1 + 6 * data[pos]
    pos += 1
    for _ in range(n_layers):
        while data[pos] & 0x80:
            pos += 1
        pos += 1
    return pos


def test_absurd_layer_length() -> None:
    """A length far past the bytes present is a truncated stream, never an allocation."""
    f = make_frame(layers=(b"abc",))
    data = pack(f)
    end = _header_end(data, 1)
    bad = data[: end - 1] + b"\xff\xff\xff\xff\x7f" + data[end:]
    for allow in (False, True):
        with pytest.raises(InvalidStream, match="truncated"):
            unpack(bad, allow_truncated_layers=allow)


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
            data = bitstream.MAGIC + bytes([bitstream.FORMAT_VERSION]) + data
        for allow in (False, True):
            try:
                unpack(data, allow_truncated_layers=allow)
            except InvalidStream:
                pass


def test_pack_refuses_unrepresentable_frames() -> None:
    with pytest.raises(ValueError):
        pack(Frame(2, 0, "x" * 65, bytes(8), (1, 1), ((1, 1, 1),), (b"",)))
    with pytest.raises(ValueError):
        pack(Frame(256, 0, "x", bytes(8), (1, 1), ((1, 1, 1),), (b"",)))
    with pytest.raises(ValueError):
        pack(Frame(0, 0, "x", bytes(8), (1, 1), ((1, 1, 1),), (b"",)))


# -- format version 2: checksums -------------------------------------------------------------------


def test_format_version_1_is_refused_naming_both_versions() -> None:
    data = bytearray(pack(make_frame()))
    data[4] = 1
    with pytest.raises(InvalidStream, match="format version 1; this build reads format version 2"):
        unpack(bytes(data))


@pytest.mark.parametrize("allow", [False, True])
def test_every_single_bit_flip_is_refused(allow: bool) -> None:
    """Header, layer lengths, layer bytes and CRCs: no flipped bit yields a Frame."""
    data = pack(make_frame(layers=(b"abc", b"", b"xyz" * 20)))
    for bit in range(8 * len(data)):
        bad = bytearray(data)
        bad[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(InvalidStream):
            unpack(bytes(bad), allow_truncated_layers=allow)


def test_prefix_cut_at_every_layer_boundary_verifies() -> None:
    layers = (b"first", b"second!", b"", b"x" * 200)
    data = pack(make_frame(layers=layers))
    end = _header_end(data, len(layers))
    for k in range(1, len(layers)):
        cut = end + sum(len(x) + bitstream.CRC_BYTES for x in layers[:k])
        for extra in (0, 1, 3):  # at the boundary, and inside the next record
            f = unpack(data[: cut + extra], allow_truncated_layers=True)
            assert f.layers == layers[:k] and f.truncated and f.missing_layers == len(layers) - k
            assert f.declared_layers == len(layers)
            with pytest.raises(InvalidStream, match="truncated"):
                unpack(data[: cut + extra])
    # cut inside layer 0: nothing complete to decode
    with pytest.raises(InvalidStream, match="truncated"):
        unpack(data[: end + 2], allow_truncated_layers=True)


def test_a_cut_non_progressive_frame_is_refused_even_when_cuts_are_allowed() -> None:
    f = dataclasses.replace(make_frame(), progressive=False)
    data = pack(f)
    with pytest.raises(InvalidStream, match="truncated"):
        unpack(data[:-10], allow_truncated_layers=True)


def test_layers_reordered_repeated_or_spliced_are_refused() -> None:
    a = make_frame(layers=(b"abcd", b"efgh", b"ijkl"))
    b = dataclasses.replace(a, image_size=(640, 480))
    da, db = pack(a), pack(b)
    end = _header_end(da, 3)
    recs = [da[end + 8 * i : end + 8 * (i + 1)] for i in range(3)]
    for order in ((1, 0, 2), (0, 0, 2), (0, 2, 1), (0, 1, 1)):
        with pytest.raises(InvalidStream, match="checksum"):
            unpack(da[:end] + b"".join(recs[i] for i in order))
    # b's header (same lengths, another image size) in front of a's layers, and the reverse
    with pytest.raises(InvalidStream, match="checksum"):
        unpack(db[:end] + da[end:])
    with pytest.raises(InvalidStream, match="checksum"):
        unpack(da[:end] + db[end:])


# -- property tests (hypothesis) -------------------------------------------------------------------

frames = st.builds(
    Frame,
    codec_id=st.integers(1, 255),
    param=st.integers(0, 255),
    bundle_id=st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=16),
    table_hash=st.binary(min_size=8, max_size=8),
    image_size=st.tuples(st.integers(1, bitstream.MAX_IMAGE_SIDE), st.integers(1, bitstream.MAX_IMAGE_SIDE)),
    shapes=st.lists(st.tuples(st.integers(1, 64), st.integers(1, 64), st.integers(1, 64)),
                    min_size=1, max_size=4).map(tuple),
    layers=st.lists(st.binary(max_size=40), min_size=1, max_size=6).map(tuple),
    progressive=st.booleans(),
    codec_flags=st.integers(0, 127),
)


def _parse(data: bytes, allow: bool) -> Frame | None:
    """The container's contract: a Frame or InvalidStream, nothing else."""
    try:
        return unpack(data, allow_truncated_layers=allow)
    except InvalidStream:
        return None


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=300), allow=st.booleans())
def test_arbitrary_bytes_give_a_frame_or_invalid_stream(data: bytes, allow: bool) -> None:
    _parse(data, allow)
    _parse(bitstream.MAGIC + bytes([bitstream.FORMAT_VERSION]) + data, allow)


@settings(max_examples=300, deadline=None)
@given(frame=frames)
def test_any_packable_frame_round_trips(frame: Frame) -> None:
    assert unpack(pack(frame)) == frame


@settings(max_examples=300, deadline=None)
@given(frame=frames, where=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7), allow=st.booleans(),
       cut=st.integers(0, 400))
def test_mutated_frames_give_a_frame_or_invalid_stream(frame: Frame, where: float, bit: int, allow: bool,
                                                       cut: int) -> None:
    data = pack(frame)
    flipped = bytearray(data)
    flipped[int(where * len(data))] ^= 1 << bit
    assert _parse(bytes(flipped), allow) is None  # a flipped bit is always caught
    got = _parse(data[: len(data) - cut], allow)  # a cut: a prefix of the layers, or refused
    if got is not None:
        assert got.layers == frame.layers[: len(got.layers)]
        assert (got.image_size, got.shapes, got.param) == (frame.image_size, frame.shapes, frame.param)
        assert cut == 0 or (allow and frame.progressive and got.truncated)
