"""The gRPC API end to end: a real server on a 127.0.0.1 port, real channels, the real bundle, codec and
detector. Malformed frames come from the real bitstream writer with one field spoiled."""

from __future__ import annotations

import dataclasses
import struct
import threading

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from palettelink import bitstream
from palettelink.codecs import Decoder
from palettelink.image import letterbox_info
from palettelink.v1 import palettelink_pb2 as pb

BUNDLE = "fall-yolov8"


def spoil(payload: bytes, **changes: object) -> bytes:
    """Re-pack a good frame with some header fields replaced."""
    return bitstream.pack(dataclasses.replace(bitstream.unpack(payload), **changes))


def absurd_shape(payload: bytes) -> bytes:
    """A header claiming a 65535×65535×1 tensor (4 G values) in front of a few bytes."""
    f = bitstream.unpack(payload)
    head = bitstream.pack(dataclasses.replace(f, layers=(b"x",)))
    cut = head.index(struct.pack(">HHH", *f.shapes[0]))
    return head[:cut] + struct.pack(">HHH", 65535, 65535, 1) + head[cut + 6:]


def malformed(good: bytes) -> list[tuple[str, bytes, str]]:
    """(what, payload, expected status) for every kind of bad frame."""
    f = bitstream.unpack(good)
    c, h, w = f.shapes[0]
    return [
        ("empty", b"", "INVALID_ARGUMENT"),
        ("truncated header", good[:12], "INVALID_ARGUMENT"),
        ("truncated layers", good[: len(good) // 2], "INVALID_ARGUMENT"),
        ("random bytes", np.random.default_rng(0).bytes(5000), "INVALID_ARGUMENT"),
        ("wrong magic", b"JUNK" + good[4:], "INVALID_ARGUMENT"),
        ("trailing junk", good + b"\x00\x01", "INVALID_ARGUMENT"),
        ("absurd tensor size", absurd_shape(good), "INVALID_ARGUMENT"),
        ("wrong tensor shape", spoil(good, shapes=((c, h, w + 1), *f.shapes[1:])), "INVALID_ARGUMENT"),
        ("another table hash", spoil(good, table_hash=bytes(8)), "FAILED_PRECONDITION"),
        ("another bundle", spoil(good, bundle_id="fall-yolov8/99"), "FAILED_PRECONDITION"),
        ("absurd image size", spoil(good, image_size=(16384, 16384)), "RESOURCE_EXHAUSTED"),
    ]


def reference_boxes(bundle, detector, payload: bytes) -> list[tuple[float, ...]]:  # noqa: ANN001
    """What the library itself finds on the decoded tensors: the server must agree."""
    d = Decoder(bundle).decode(payload)
    dets = detector.detect_tensors(d.tensors, letterbox_info(*d.image_size, bundle.input_size))
    return [(*x.xyxy, x.class_id, x.score) for x in dets]


def boxes_of(result: pb.FrameResult) -> list[tuple[float, ...]]:
    return [(b.x1, b.y1, b.x2, b.y2, b.class_id, b.score) for b in result.boxes]


def assert_same_boxes(got: list[tuple[float, ...]], want: list[tuple[float, ...]]) -> None:
    assert len(got) == len(want)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=0.05, rtol=1e-3)


def frames(header: pb.StreamHeader | None, payloads: list[bytes], first_id: int = 1):  # noqa: ANN201
    if header is not None:
        yield pb.StreamRequest(header=header)
    for i, p in enumerate(payloads):
        yield pb.StreamRequest(frame=pb.Frame(frame_id=first_id + i, payload=p, edge_front_ms=50.0,
                                              edge_encode_ms=5.0))


def test_health_is_serving(live_server) -> None:  # noqa: ANN001
    with grpc.insecure_channel(live_server.grpc_address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for name in ("", "palettelink.v1.PaletteLink"):
            assert stub.Check(health_pb2.HealthCheckRequest(service=name)).status == \
                health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_service(live_server) -> None:  # noqa: ANN001
    with grpc.insecure_channel(live_server.grpc_address) as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        services = db.get_services()
        assert "palettelink.v1.PaletteLink" in services
        assert "grpc.health.v1.Health" in services
        fd = db.FindFileContainingSymbol("palettelink.v1.PaletteLink")
        assert fd.name == "palettelink/v1/palettelink.proto"


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_answers_v1_and_v1alpha(live_server, version: str) -> None:  # noqa: ANN001
    """Generic clients ask ``grpc.reflection.v1`` first (grpcurl, grpcui, Postman), older ones
    ``v1alpha``: both list the services and describe them, the reflection services included."""
    from google.protobuf import descriptor_pb2
    from grpc_reflection.v1alpha import reflection_pb2 as r  # the messages are the same in v1

    def ask(ch: grpc.Channel, **req: object) -> r.ServerReflectionResponse:
        call = ch.stream_stream(f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                                request_serializer=r.ServerReflectionRequest.SerializeToString,
                                response_deserializer=r.ServerReflectionResponse.FromString)
        (resp,) = list(call(iter([r.ServerReflectionRequest(**req)]), timeout=10))
        assert not resp.HasField("error_response"), resp.error_response
        return resp

    def file_of(resp: r.ServerReflectionResponse) -> descriptor_pb2.FileDescriptorProto:
        raw = resp.file_descriptor_response.file_descriptor_proto[0]
        return descriptor_pb2.FileDescriptorProto.FromString(raw)

    with grpc.insecure_channel(live_server.grpc_address) as ch:
        names = {s.name for s in ask(ch, list_services="").list_services_response.service}
        assert {"palettelink.v1.PaletteLink", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection"} <= names
        fd = file_of(ask(ch, file_containing_symbol="palettelink.v1.PaletteLink"))
        assert fd.name == "palettelink/v1/palettelink.proto"
        assert {m.name for m in fd.service[0].method} >= {"Stream", "Analyze", "GetInfo"}
        for package in ("grpc.reflection.v1", "grpc.reflection.v1alpha"):
            fd = file_of(ask(ch, file_containing_symbol=f"{package}.ServerReflection"))
            assert fd.package == package and fd.service[0].name == "ServerReflection"
            methods = fd.service[0].method
            types = {m.input_type for m in methods} | {m.output_type for m in methods}
            assert types == {f".{package}.ServerReflectionRequest", f".{package}.ServerReflectionResponse"}


def test_get_info(grpc_stub, bundle) -> None:  # noqa: ANN001
    info = grpc_stub.GetInfo(pb.GetInfoRequest(), timeout=10)
    assert info.server_version
    (b,) = info.bundles
    assert (b.name, b.version, b.table_hash) == (bundle.name, bundle.version, bundle.table_hash_hex)
    assert list(b.tasks) == ["detect"]
    assert list(b.class_names) == bundle.class_names
    assert b.input_size == 640
    codecs = {c.name: c for c in b.codecs}
    assert [lv.level for lv in codecs["baseline"].levels] == list(range(2, 9))
    assert [(t.name, t.layer, list(t.shape)) for t in b.tensors] == \
        [(t.name, t.layer, list(t.shape)) for t in bundle.tensors]


def test_analyze_returns_the_library_boxes(grpc_stub, coded_frames, bundle, detector) -> None:  # noqa: ANN001
    payload = coded_frames["bus"]
    r = grpc_stub.Analyze(pb.AnalyzeRequest(bundle=BUNDLE, task="detect", payload=payload), timeout=30).result
    assert not r.HasField("error")
    assert (r.codec, r.level, r.payload_bytes, r.image_width, r.image_height) == \
        ("baseline", 4, len(payload), 810, 1080)
    assert r.bpp == pytest.approx(8 * len(payload) / (810 * 1080))
    assert len(r.boxes) >= 3 and {b.class_name for b in r.boxes} <= set(bundle.class_names)
    assert_same_boxes(boxes_of(r), reference_boxes(bundle, detector, payload))
    t = r.timings
    assert t.decode_ms > 0 and t.task_ms > 0 and t.queue_ms >= 0
    assert t.total_ms >= t.decode_ms + t.task_ms


def test_analyze_defaults_to_the_only_bundle_and_its_task(grpc_stub, coded_frames) -> None:  # noqa: ANN001
    r = grpc_stub.Analyze(pb.AnalyzeRequest(payload=coded_frames["zidane"]), timeout=30).result
    assert len(r.boxes) >= 2


MALFORMED = ["empty", "truncated header", "truncated layers", "random bytes", "wrong magic", "trailing junk",
             "absurd tensor size", "wrong tensor shape", "another table hash", "another bundle",
             "absurd image size"]


def test_every_malformed_case_is_tested(coded_frames) -> None:  # noqa: ANN001
    assert [what for what, _, _ in malformed(coded_frames["bus"])] == MALFORMED


@pytest.mark.parametrize("what", MALFORMED)
def test_analyze_bad_payload_is_a_grpc_status(grpc_stub, coded_frames, what: str) -> None:  # noqa: ANN001
    payload, status = {w: (p, s) for w, p, s in malformed(coded_frames["bus"])}[what]
    with pytest.raises(grpc.RpcError) as e:
        grpc_stub.Analyze(pb.AnalyzeRequest(bundle=BUNDLE, payload=payload), timeout=30)
    assert e.value.code().name == status, what
    assert e.value.details()


@pytest.mark.parametrize(("bundle_name", "task", "status"), [
    ("no-such-bundle", "detect", "NOT_FOUND"),
    ("fall-yolov8/7", "detect", "NOT_FOUND"),
    (BUNDLE, "segment", "INVALID_ARGUMENT"),
    (BUNDLE, "levitate", "INVALID_ARGUMENT"),
])
def test_analyze_request_errors(grpc_stub, coded_frames, bundle_name: str, task: str,  # noqa: ANN001
                                status: str) -> None:
    with pytest.raises(grpc.RpcError) as e:
        grpc_stub.Analyze(pb.AnalyzeRequest(bundle=bundle_name, task=task, payload=coded_frames["bus"]),
                          timeout=30)
    assert e.value.code().name == status


def test_message_size_limit(grpc_stub) -> None:  # noqa: ANN001
    with pytest.raises(grpc.RpcError) as e:
        grpc_stub.Analyze(pb.AnalyzeRequest(bundle=BUNDLE, payload=bytes(17 << 20)), timeout=30)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_stream_answers_every_frame_in_order(grpc_stub, coded_frames) -> None:  # noqa: ANN001
    header = pb.StreamHeader(client_id="cam-7", bundle=BUNDLE, task="detect")
    payloads = [coded_frames["bus"], coded_frames["zidane"], coded_frames["bus"], coded_frames["zidane"]]
    out = [r.result for r in grpc_stub.Stream(frames(header, payloads, first_id=100), timeout=60)]
    assert [r.frame_id for r in out] == [100, 101, 102, 103]
    assert all(not r.HasField("error") and len(r.boxes) >= 2 for r in out)
    assert_same_boxes(boxes_of(out[0]), boxes_of(out[2]))
    assert [r.image_width for r in out] == [810, 1280, 810, 1280]


def test_stream_bad_frames_get_errors_and_the_stream_goes_on(grpc_stub, coded_frames) -> None:  # noqa: ANN001
    good = coded_frames["zidane"]
    cases = malformed(good)
    payloads = [good] + [p for _, p, _ in cases] + [good]
    out = [r.result for r in grpc_stub.Stream(frames(pb.StreamHeader(bundle=BUNDLE), payloads), timeout=60)]
    assert [r.frame_id for r in out] == list(range(1, len(payloads) + 1))
    assert len(out[0].boxes) >= 2 and not out[0].HasField("error")
    for (what, payload, status), r in zip(cases, out[1:-1], strict=True):
        assert r.HasField("error"), what
        assert r.error.status == status, what
        assert r.error.code == getattr(grpc.StatusCode, status).value[0]
        assert r.error.message and not r.boxes
        assert r.payload_bytes == len(payload)
    assert not out[-1].HasField("error")
    assert_same_boxes(boxes_of(out[-1]), boxes_of(out[0]))


def test_stream_without_header_is_invalid_argument(grpc_stub, coded_frames) -> None:  # noqa: ANN001
    with pytest.raises(grpc.RpcError) as e:
        list(grpc_stub.Stream(frames(None, [coded_frames["bus"]]), timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "StreamHeader" in e.value.details()


def test_stream_header_for_unknown_bundle_is_not_found(grpc_stub, coded_frames) -> None:  # noqa: ANN001
    with pytest.raises(grpc.RpcError) as e:
        list(grpc_stub.Stream(frames(pb.StreamHeader(bundle="nope"), [coded_frames["bus"]]), timeout=30))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_stream_second_header_ends_the_stream(grpc_stub, coded_frames) -> None:  # noqa: ANN001
    def requests():  # noqa: ANN202
        yield from frames(pb.StreamHeader(bundle=BUNDLE), [coded_frames["bus"]])
        yield pb.StreamRequest(header=pb.StreamHeader(bundle=BUNDLE))

    got = []
    with pytest.raises(grpc.RpcError) as e:
        for r in grpc_stub.Stream(requests(), timeout=30):
            got.append(r.result.frame_id)
    assert got == [1]
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_empty_stream_just_ends(grpc_stub) -> None:  # noqa: ANN001
    assert list(grpc_stub.Stream(iter(()), timeout=10)) == []
    assert list(grpc_stub.Stream(frames(pb.StreamHeader(bundle=BUNDLE), []), timeout=10)) == []


def test_concurrent_streams_share_the_model(live_server, coded_frames) -> None:  # noqa: ANN001
    """Three clients on their own channels at once: each gets its own frames, in order, right."""
    from palettelink.v1 import palettelink_pb2_grpc

    names = ["bus", "zidane", "bus"]
    results: dict[int, list[pb.FrameResult]] = {}
    errors: list[BaseException] = []

    def client(k: int) -> None:
        try:
            with grpc.insecure_channel(live_server.grpc_address) as ch:
                stub = palettelink_pb2_grpc.PaletteLinkStub(ch)
                payloads = [coded_frames[names[(k + i) % 3]] for i in range(3)]
                results[k] = [r.result for r in stub.Stream(
                    frames(pb.StreamHeader(client_id=f"c{k}", bundle=BUNDLE), payloads, first_id=10 * k),
                    timeout=120)]
        except BaseException as e:  # surfaced below; a thread cannot fail the test itself
            errors.append(e)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, errors
    want = {n: None for n in set(names)}
    for k in range(3):
        assert [r.frame_id for r in results[k]] == [10 * k, 10 * k + 1, 10 * k + 2]
        for i, r in enumerate(results[k]):
            name = names[(k + i) % 3]
            assert not r.HasField("error")
            assert r.image_width == (810 if name == "bus" else 1280)
            if want[name] is None:
                want[name] = boxes_of(r)
            assert_same_boxes(boxes_of(r), want[name])
