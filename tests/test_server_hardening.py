"""Hardening through the real gRPC server and HTTP app on 127.0.0.1 (issue 10): client bytes that made
the coder raise a bare exception, client strings that were stored and echoed at any length, and HTTP
errors outside the project's JSON error shape.

Bad frames are real frames (the baseline fixture and a palette frame from the session bundle) with one
thing spoiled and the container re-packed, so only the spoiled part is wrong."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import grpc
import pytest

from palettelink import bitstream
from palettelink.v1 import palettelink_pb2 as pb

BUNDLE = "fall-yolov8"
MiB = 1 << 20


def zero_last_word(payload: bytes, layer: int) -> bytes:
    """``payload`` with the last 32-bit word of one layer's entropy-coded bytes set to zero (the coded
    words end every layer of both codecs); the container stays valid."""
    f = bitstream.unpack(payload)
    data = f.layers[layer]
    assert len(data) >= 4 and data[-4:] != bytes(4)
    layers = (*f.layers[:layer], data[:-4] + bytes(4), *f.layers[layer + 1:])
    return bitstream.pack(dataclasses.replace(f, layers=layers))


@pytest.fixture(scope="module")
def palette_frame(bundle, images: list[Path]) -> bytes:  # noqa: ANN001
    """bus.jpg through the session bundle's trained palette codec at its finest level (every layer)."""
    from palettelink.codecs import available, make_encoder
    from palettelink.image import load_image

    if "palette" not in available(bundle):
        pytest.skip("this bundle has no trained palette codec (assets/codecs/fall-yolov8 not built yet)")
    return make_encoder(bundle, "palette").encode(load_image(images[0]), 0).payload


def stream(stub, header: pb.StreamHeader, payloads: list[bytes]) -> list[pb.FrameResult]:  # noqa: ANN001
    reqs = [pb.StreamRequest(header=header)] + [
        pb.StreamRequest(frame=pb.Frame(frame_id=i, payload=p)) for i, p in enumerate(payloads)]
    return [r.result for r in stub.Stream(iter(reqs), timeout=120)]


# -- 1. client bytes never reach INTERNAL --------------------------------------------------------


@pytest.mark.parametrize("codec", ["baseline", "palette"])
def test_zero_last_word_is_invalid_argument_via_analyze_and_stream(
        grpc_stub, coded_frames, palette_frame, codec: str, caplog: pytest.LogCaptureFixture) -> None:  # noqa: ANN001
    good = coded_frames["bus"] if codec == "baseline" else palette_frame
    n_layers = len(bitstream.unpack(good).layers)
    bad = [zero_last_word(good, i) for i in range(n_layers)]
    with caplog.at_level(logging.ERROR, "palettelink.server"):
        with pytest.raises(grpc.RpcError) as e:
            grpc_stub.Analyze(pb.AnalyzeRequest(bundle=BUNDLE, payload=bad[-1]), timeout=60)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
        assert "zero word" in e.value.details()
        ok = grpc_stub.Analyze(pb.AnalyzeRequest(bundle=BUNDLE, payload=good), timeout=120).result
        assert not ok.HasField("error") and ok.codec == codec and ok.boxes

        out = stream(grpc_stub, pb.StreamHeader(bundle=BUNDLE, client_id="zero-word"), [*bad, good])
    assert [r.frame_id for r in out] == list(range(n_layers + 1))
    for i, r in enumerate(out[:-1]):
        assert r.error.status == "INVALID_ARGUMENT", (i, r.error)
        assert "zero word" in r.error.message and not r.boxes
    assert not out[-1].HasField("error") and out[-1].codec == codec
    assert [(b.class_id, round(b.score, 3)) for b in out[-1].boxes] == \
        [(b.class_id, round(b.score, 3)) for b in ok.boxes]
    assert "unexpected error" not in caplog.text  # no traceback: nothing went the INTERNAL way
