"""Back-pressure through the real gRPC server on 127.0.0.1 (issue 10, point 5): stream limits per client
and in total counted before the header, idle and header-less streams closed, admission control that
refuses frames with a retry hint, and health checks / GetInfo / other clients never starved. Small
limits and timeouts keep it to seconds."""

from __future__ import annotations

import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from palettelink.v1 import palettelink_pb2 as pb
from palettelink.v1 import palettelink_pb2_grpc

BUNDLE = "fall-yolov8"


@pytest.fixture(scope="module")
def limited(bundles_root: Path):  # noqa: ANN201 - server.main.PaletteLinkServer
    """A server of its own with tiny limits: 4 streams in all, 2 per client, 1 frame admitted at a
    time, header within 0.5 s, a frame at least every 1.5 s."""
    from server.main import PaletteLinkServer
    from server.service import Service

    svc = Service(bundles_root, [BUNDLE], max_batch=1, batch_wait_ms=0, max_streams=4,
                  max_streams_per_client=2, max_pending=1, max_stream_queue=4, stream_idle_timeout=1.5,
                  header_timeout=0.5, warmup=False, verify=False)
    srv = PaletteLinkServer(svc)
    srv.start()
    srv.load()
    yield srv
    srv.stop(grace=0.5)


@pytest.fixture()
def channel(limited) -> Iterator[grpc.Channel]:  # noqa: ANN001
    with grpc.insecure_channel(limited.grpc_address) as ch:
        yield ch


class Held:
    """A Stream call whose requests the test feeds one by one (None closes the request side)."""

    def __init__(self, ch: grpc.Channel, client: str | None, timeout: float = 20,
                 bundle: str = BUNDLE) -> None:
        self.q: queue.Queue[pb.StreamRequest | None] = queue.Queue()
        if client is not None:
            self.q.put(pb.StreamRequest(header=pb.StreamHeader(bundle=bundle, client_id=client)))

        def gen() -> Iterator[pb.StreamRequest]:
            while (item := self.q.get()) is not None:
                yield item

        self.call = palettelink_pb2_grpc.PaletteLinkStub(ch).Stream(gen(), timeout=timeout)

    def send(self, frame_id: int, payload: bytes) -> None:
        self.q.put(pb.StreamRequest(frame=pb.Frame(frame_id=frame_id, payload=payload)))

    def error(self) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as e:
            list(self.call)
        return e.value

    def close(self) -> None:
        self.q.put(None)
        self.call.cancel()


def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def healthy(ch: grpc.Channel, token: str | None = None) -> None:
    """Health.Check and GetInfo answer at once."""
    st = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2).status
    assert st == health_pb2.HealthCheckResponse.SERVING
    meta = [("authorization", f"Bearer {token}")] if token else None
    info = palettelink_pb2_grpc.PaletteLinkStub(ch).GetInfo(pb.GetInfoRequest(), timeout=2, metadata=meta)
    assert [b.name for b in info.bundles] == [BUNDLE]


def retry_hint(err: grpc.RpcError) -> int:
    meta = dict(err.trailing_metadata() or ())  # type: ignore[attr-defined]
    return int(meta["retry-after-ms"])


def test_per_client_and_total_stream_limits(limited, channel: grpc.Channel, coded_frames) -> None:  # noqa: ANN001
    slots = limited.service.slots
    held = []
    try:
        for _ in range(2):
            held.append(Held(channel, "greedy"))
        until(lambda: slots.count("greedy") == 2)
        third = Held(channel, "greedy")
        err = third.error()
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "'greedy' already holds its limit of 2 streams" in err.details()
        assert "--max-streams-per-client" in err.details()
        assert retry_hint(err) > 0
        healthy(channel)

        # Another client below its share still streams, and gets answers.
        other = Held(channel, "polite")
        held.append(other)
        other.send(7, coded_frames["bus"])
        first = next(iter(other.call)).result
        assert first.frame_id == 7 and first.boxes and not first.HasField("error")

        held.append(Held(channel, "polite"))
        until(lambda: slots.in_use == 4)
        err = Held(channel, "late").error()
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit of 4 streams (--max-streams)" in err.details() and retry_hint(err) > 0
        healthy(channel)  # the worker pool has room beside the streams
    finally:
        for h in held:
            h.close()
    until(lambda: slots.in_use == 0)
    metrics = httpx.get(f"{limited.http_url}/metrics", timeout=5).text
    assert re.search(r'palettelink_streams_refused_total\{reason="limit"\} [2-9]', metrics), metrics


def test_headerless_and_idle_streams_are_closed(limited, channel: grpc.Channel) -> None:  # noqa: ANN001
    slots = limited.service.slots
    mute = [Held(channel, None), Held(channel, None)]
    until(lambda: slots.in_use == 2)
    err = Held(channel, None).error()  # header-less streams of one peer count against its share
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    healthy(channel)
    t0 = time.monotonic()
    for h in mute:
        err = h.error()
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "no StreamHeader within 0.5 s" in err.details()
    assert time.monotonic() - t0 < 3

    idle = Held(channel, "sleepy")
    t0 = time.monotonic()
    err = idle.error()
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "no frame for 1.5 s (--stream-idle-timeout)" in err.details()
    assert 1.0 < time.monotonic() - t0 < 4
    until(lambda: slots.in_use == 0)
    # The threads that read the closed streams end with them (nothing piles up per idle stream).
    until(lambda: not [t for t in threading.enumerate() if t.name == "stream-inbox"])
    metrics = httpx.get(f"{limited.http_url}/metrics", timeout=5).text
    assert 'palettelink_streams_closed_idle_total{reason="header"} 2.0' in metrics
    assert 'palettelink_streams_closed_idle_total{reason="frame"} 1.0' in metrics


def test_admission_refuses_with_a_retry_hint_and_answers_every_frame(limited, channel: grpc.Channel,  # noqa: ANN001
                                                                     coded_frames) -> None:  # noqa: ANN001
    """One frame admitted at a time: frames that arrive while one is decoded are answered
    RESOURCE_EXHAUSTED at once, with a retry hint; every frame gets exactly one answer."""
    h = Held(channel, "burst")
    for i in range(6):
        h.send(i, coded_frames["zidane"])
    h.q.put(None)
    out = [r.result for r in h.call]
    assert sorted(r.frame_id for r in out) == list(range(6))
    refused = [r for r in out if r.HasField("error")]
    answered = [r for r in out if not r.HasField("error")]
    assert answered and answered[0].boxes
    assert refused, "nothing was refused with 1 frame admitted at a time"
    for r in refused:
        assert r.error.status == "RESOURCE_EXHAUSTED" and r.error.retry_after_ms > 0
        assert "--max-pending-frames" in r.error.message and "retry after" in r.error.message
    assert limited.service.admission.pending == 0
    metrics = httpx.get(f"{limited.http_url}/metrics", timeout=5).text
    assert re.search(r'palettelink_frames_refused_total\{reason="server_queue"\} [1-9]', metrics)
    assert "palettelink_pending_frames 0.0" in metrics

    # The unary call and the HTTP twin pass the same admission and answer when there is room.
    stub = palettelink_pb2_grpc.PaletteLinkStub(channel)
    assert stub.Analyze(pb.AnalyzeRequest(payload=coded_frames["bus"]), timeout=30).result.boxes


def test_the_edge_stream_resends_refused_frames_after_the_hint(limited, channel: grpc.Channel,  # noqa: ANN001
                                                               coded_frames) -> None:  # noqa: ANN001
    """The real edge transport against the same 1-frame admission: refused frames are re-sent after
    the server's retry hint, and every frame ends up answered once, without an error."""
    from edge.transport import EdgeStream

    s = EdgeStream(channel, pb.StreamHeader(bundle=BUNDLE, client_id="edge"), window=4, frame_timeout=20,
                   overload_retries=50)
    replies = []
    try:
        for i in range(6):
            replies += list(s.send(pb.Frame(frame_id=i, payload=coded_frames["zidane"])))
        replies += list(s.finish())
    finally:
        s.close()
    assert sorted(r.frame_id for r in replies) == list(range(6))
    assert [r.frame_id for r in replies if r.result.HasField("error")] == []
    assert s.deferred >= 1


def test_latency_feedback_admits_only_a_batch_while_frames_are_slow() -> None:
    from palettelink.errors import ResourceExhausted
    from server.admission import Admission
    from server.metrics import Metrics

    a = Admission(Metrics(), max_pending=10, shed_latency_ms=100, floor=2)
    for _ in range(3):
        a.admit()
    for _ in range(3):
        a.done(0.5)  # frames took 500 ms: over the 100 ms target
    a.admit()
    a.admit()
    with pytest.raises(ResourceExhausted, match="--shed-latency-ms") as e:
        a.admit()
    assert e.value.retry_after_ms >= 50
    for _ in range(2):
        a.done(0.001)
    for _ in range(20):  # fast again: the average comes down and the full bound applies
        a.admit()
        a.done(0.001)
    for _ in range(10):
        a.admit()
    with pytest.raises(ResourceExhausted, match="--max-pending-frames"):
        a.admit()


def test_with_tokens_the_share_is_the_token_clients_whatever_client_id_it_claims(limited) -> None:  # noqa: ANN001
    from server.auth import TokenAuth
    from server.main import PaletteLinkServer

    srv = PaletteLinkServer(limited.service, auth=TokenAuth({"tok-a": "device-a", "tok-b": "device-b"}))
    srv.start()
    srv.load()  # the service is loaded already: only reports SERVING
    held = []
    try:
        with grpc.insecure_channel(srv.grpc_address) as ch:
            stub = palettelink_pb2_grpc.PaletteLinkStub(ch)

            def open_(token: str, client_id: str) -> Iterator[pb.StreamResponse]:
                reqs: queue.Queue[pb.StreamRequest | None] = queue.Queue()
                reqs.put(pb.StreamRequest(header=pb.StreamHeader(bundle=BUNDLE, client_id=client_id)))
                held.append(reqs)
                return stub.Stream(iter(reqs.get, None), timeout=10,
                                   metadata=[("authorization", f"Bearer {token}")])

            calls = [open_("tok-a", "x"), open_("tok-a", "y")]
            until(lambda: limited.service.slots.count("device-a") == 2)
            with pytest.raises(grpc.RpcError) as e:
                list(open_("tok-a", "z"))
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "'device-a' already holds its limit of 2 streams" in e.value.details()
            other = open_("tok-b", "x")  # another token's client still streams
            until(lambda: limited.service.slots.count("device-b") == 1)
            healthy(ch, "tok-b")
            for c in [*calls, other]:
                c.cancel()
    finally:
        for q in held:
            q.put(None)
        srv.stop(grace=0.5, close_service=False)
    until(lambda: limited.service.slots.in_use == 0)


def test_one_answer_per_frame_in_every_outcome_and_none_on_a_refused_stream(limited, channel: grpc.Channel,  # noqa: ANN001
                                                                            coded_frames) -> None:  # noqa: ANN001
    """The server's side of "one record per input frame": on an open stream every frame gets exactly one
    answer whatever its outcome (ok, refused under load with a retry hint, failed); a stream refused as
    a whole (stream limit, token, unknown bundle) answers no frame, only its one status, which the edge
    turns into one record per frame it sent."""
    from server.auth import TokenAuth
    from server.main import PaletteLinkServer

    good, bad = coded_frames["zidane"], coded_frames["bus"][:40]
    h = Held(channel, "mixed")
    for i in range(8):
        h.send(i, bad if i % 4 == 3 else good)
    h.q.put(None)
    out = [r.result for r in h.call]
    assert sorted(r.frame_id for r in out) == list(range(8)), [r.frame_id for r in out]
    kinds = {r.frame_id: r.error.status or "OK" for r in out}
    for i, kind in kinds.items():  # a bad frame fails (unless refused first), a good one answers
        assert kind in ({"INVALID_ARGUMENT"} if i % 4 == 3 else {"OK"}) | {"RESOURCE_EXHAUSTED"}, kinds
    assert "OK" in kinds.values() and "RESOURCE_EXHAUSTED" in kinds.values(), kinds

    def refused(call: Held, frames: int = 2) -> grpc.RpcError:
        for i in range(frames):
            call.send(i, good)
        answers = []
        with pytest.raises(grpc.RpcError) as e:
            answers.extend(call.call)
        call.q.put(None)
        assert answers == [], answers
        return e.value

    held = [Held(channel, "full"), Held(channel, "full")]
    try:
        until(lambda: limited.service.slots.count("full") == 2)
        assert refused(Held(channel, "full")).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        for x in held:
            x.close()
    assert refused(Held(channel, "lost", bundle="no-such-bundle")).code() == grpc.StatusCode.NOT_FOUND
    srv = PaletteLinkServer(limited.service, auth=TokenAuth({"tok": "cam"}))
    srv.start()
    srv.load()
    try:
        with grpc.insecure_channel(srv.grpc_address) as ch:
            assert refused(Held(ch, "no-token")).code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        srv.stop(grace=0.5, close_service=False)
    until(lambda: limited.service.slots.in_use == 0)
