"""Damaged and inconsistent frames through the real gRPC server on 127.0.0.1 (issue 10): the container's
chained CRC-32 (format version 2) and the codecs' consistency checks answer INVALID_ARGUMENT, never a
changed box list, and a sound frame afterwards is answered as before.

Damage is done to the raw bytes (as a network or a bad relay would); inconsistent frames are sound
containers re-packed around contents the codec never writes."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy as np
import pytest

from palettelink import bitstream
from palettelink.v1 import palettelink_pb2 as pb

BUNDLE = "fall-yolov8"


@pytest.fixture(scope="module")
def palette_frames(bundle, images: list[Path]) -> dict[str, bytes]:  # noqa: ANN001
    """bus.jpg and zidane.jpg through the session bundle's trained palette codec, finest level."""
    from palettelink.codecs import available, make_encoder
    from palettelink.image import load_image

    if "palette" not in available(bundle):
        pytest.skip("this bundle has no trained palette codec (assets/codecs/fall-yolov8 not built yet)")
    enc = make_encoder(bundle, "palette")
    return {p.stem: enc.encode(load_image(p), 0).payload for p in images}


@pytest.fixture(scope="module")
def frames(coded_frames, palette_frames) -> dict[str, dict[str, bytes]]:  # noqa: ANN001
    return {"baseline": coded_frames, "palette": palette_frames}


def header_end(payload: bytes) -> int:
    """Where the first layer starts: the records after the header are layer bytes + a 4-byte CRC."""
    f = bitstream.unpack(payload)
    return len(payload) - sum(len(x) + bitstream.CRC_BYTES for x in f.layers)


def stream(stub, payloads: list[bytes], client: str) -> list[pb.FrameResult]:  # noqa: ANN001
    reqs = [pb.StreamRequest(header=pb.StreamHeader(bundle=BUNDLE, client_id=client))] + [
        pb.StreamRequest(frame=pb.Frame(frame_id=i, payload=p)) for i, p in enumerate(payloads)]
    return [r.result for r in stub.Stream(iter(reqs), timeout=300)]


def boxes(r: pb.FrameResult) -> list[tuple[int, float, float, float, float, float]]:
    return [(b.class_id, round(b.score, 4), round(b.x1, 1), round(b.y1, 1), round(b.x2, 1), round(b.y2, 1))
            for b in r.boxes]


def analyze(stub, payload: bytes) -> pb.FrameResult:  # noqa: ANN001
    return stub.Analyze(pb.AnalyzeRequest(bundle=BUNDLE, payload=payload), timeout=120).result


def assert_refused_then_good(stub, bad: list[bytes], good: bytes, client: str,  # noqa: ANN001
                             says: str | None = None) -> None:
    """Every bad frame INVALID_ARGUMENT with no boxes; the good one after them answered as alone."""
    expected = analyze(stub, good)
    assert not expected.HasField("error") and expected.boxes
    out = stream(stub, [*bad, good], client)
    assert [r.frame_id for r in out] == list(range(len(bad) + 1))
    for i, r in enumerate(out[:-1]):
        assert r.error.status == "INVALID_ARGUMENT", (i, r.error, boxes(r))
        assert not r.boxes
        if says is not None:
            assert says in r.error.message, (i, r.error.message)
    assert not out[-1].HasField("error") and boxes(out[-1]) == boxes(expected)


def flip(payload: bytes, bit: int) -> bytes:
    out = bytearray(payload)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


@pytest.mark.parametrize("codec", ["baseline", "palette"])
def test_every_header_bit_flip_is_invalid_argument(grpc_stub, frames, codec: str) -> None:  # noqa: ANN001
    good = frames[codec]["bus"]
    n_bits = 8 * header_end(good)
    bad = [flip(good, b) for b in range(n_bits)]  # every bit of the header (~450)
    rng = random.Random(10)
    bad += [flip(good, rng.randrange(n_bits, 8 * len(good))) for _ in range(100)]  # and of the layers
    assert_refused_then_good(grpc_stub, bad, good, f"flips-{codec}")


def test_rewritten_baseline_channel_range_is_refused(grpc_stub, coded_frames) -> None:  # noqa: ANN001
    """The probe that turned 3 "Normal" boxes into 2 "Fall" boxes: a channel's float16 min/max rewritten
    in transit (CRC), and a re-packed frame with min > max (consistency)."""
    good = coded_frames["bus"]
    start = header_end(good)
    f = bitstream.unpack(good)
    rewritten = []
    for lo, hi in ((-100.0, 100.0), (0.0, 1.0), (5.0, -5.0)):
        b = bytearray(good)
        b[start : start + 4] = np.array([lo, hi], "<f2").tobytes()
        rewritten.append(bytes(b))
    assert_refused_then_good(grpc_stub, rewritten, good, "range-crc", says="checksum")
    layer0 = f.layers[0]
    swapped = layer0[2:4] + layer0[0:2] + layer0[4:]
    repacked = bitstream.pack(dataclasses.replace(f, layers=(swapped, *f.layers[1:])))
    assert_refused_then_good(grpc_stub, [repacked], good, "range-order", says="min > max")


@pytest.mark.parametrize("codec", ["baseline", "palette"])
def test_header_payload_splices_between_two_images_are_refused(grpc_stub, frames, codec: str) -> None:  # noqa: ANN001
    """Half of these were accepted before. A splice inside the layers of a progressive frame may leave
    a frame shorter than its header declares: then it is a cut stream of the first image whose
    complete layers are all its own (each CRC verified) and is answered as exactly that cut."""
    a, b = frames[codec]["bus"], frames[codec]["zidane"]
    whole = [a[: header_end(a)] + b[header_end(b):], b[: header_end(b)] + a[header_end(a):]]
    assert_refused_then_good(grpc_stub, whole, a, f"splice-{codec}", says="")
    rng = random.Random(3)
    in_header = range(1, max(header_end(a), header_end(b)))
    in_layers = [rng.randrange(min(header_end(a), header_end(b)), min(len(a), len(b))) for _ in range(40)]
    splices = [(p, k, p[:k] + q[k:]) for k in [*in_header, *in_layers] for p, q in ((a, b), (b, a))]
    splices = [(p, k, x) for p, k, x in splices if x not in (a, b)]
    out = stream(grpc_stub, [x for _, _, x in splices], f"splices-{codec}")
    for (p, k, x), r in zip(splices, out, strict=True):
        if r.HasField("error"):
            assert r.error.status == "INVALID_ARGUMENT" and not r.boxes, (k, r.error)
            continue
        assert codec == "palette" and k >= header_end(p) and len(x) < len(p) and r.truncated, k
        assert boxes(r) == boxes(analyze(grpc_stub, p[: len(x)]))  # the same cut of its own image
    assert sum(r.HasField("error") for r in out) >= len(in_header)


def test_reordered_or_repeated_palette_layers_are_refused(grpc_stub, palette_frames) -> None:  # noqa: ANN001
    """Layer records moved in transit, with the header's lengths moved to match (so the framing is
    consistent): the chained CRC still refuses them."""
    good = palette_frames["bus"]
    f = bitstream.unpack(good)
    start = header_end(good)
    lengths = b"".join(bitstream._uvarint(len(x)) for x in f.layers)
    head = good[: start - len(lengths)]
    records, pos = [], start
    for x in f.layers:
        records.append(good[pos : pos + len(x) + bitstream.CRC_BYTES])
        pos += len(x) + bitstream.CRC_BYTES

    def rebuild(order: list[int]) -> bytes:
        return (head + b"".join(bitstream._uvarint(len(f.layers[i])) for i in order)
                + b"".join(records[i] for i in order))

    n = len(f.layers)
    assert rebuild(list(range(n))) == good
    orders = [[1, 0, *range(2, n)], [0, 2, 1, *range(3, n)], [0, 0, *range(2, n)], [*range(n - 1), n - 2]]
    assert_refused_then_good(grpc_stub, [rebuild(o) for o in orders], good, "reorder", says="checksum")


def test_empty_or_inconsistent_palette_frames_are_refused(grpc_stub, palette_frames) -> None:  # noqa: ANN001
    good = palette_frames["bus"]
    f = bitstream.unpack(good)
    n = len(f.layers)
    bad = [
        bitstream.pack(dataclasses.replace(f, layers=(b"",) * n)),  # decoded as level 0 before
        bitstream.pack(dataclasses.replace(f, layers=(b"",))),
        bitstream.pack(dataclasses.replace(f, layers=(*f.layers, f.layers[-1]))),  # more layers than levels
        bitstream.pack(dataclasses.replace(f, param=f.param + 1)),
        bitstream.pack(dataclasses.replace(f, progressive=False)),
    ]
    assert_refused_then_good(grpc_stub, bad, good, "inconsistent")
    out = stream(grpc_stub, bad[:2], "empty")
    assert all("empty" in r.error.message for r in out)


def test_a_palette_stream_cut_at_every_layer_boundary_is_answered(grpc_stub, palette_frames) -> None:  # noqa: ANN001
    """Cutting is not damage: each prefix of whole layers verifies and decodes at its coarser level."""
    good = palette_frames["bus"]
    f = bitstream.unpack(good)
    n = len(f.layers)
    ends, pos = [], header_end(good)
    for x in f.layers:
        pos += len(x) + bitstream.CRC_BYTES
        ends.append(pos)
    out = stream(grpc_stub, [good[:e] for e in ends[:-1]] + [good[: ends[-2] + 7]], "cuts")
    for k, r in enumerate(out[:-1], start=1):
        assert not r.HasField("error"), (k, r.error)
        assert r.truncated and r.level == f.param - (k - 1)
    assert out[-1].truncated and out[-1].level == f.param - (n - 2)
