"""A client that ignores retry hints cannot starve the others (issue 20): per-client fair share of
admission control, throttled early resends, and gRPC's worker limit refused like every other limit
(retry hint, flag named). Real servers on 127.0.0.1; the load comes from the loadtest tool's own
streams (palettelink/tools/loadtest.py), one kind of them made rude: it never pauses for a retry hint."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from palettelink.v1 import palettelink_pb2 as pb
from palettelink.v1 import palettelink_pb2_grpc

BUNDLE = "fall-yolov8"


# -- fair share, in isolation ----------------------------------------------------------------------


def test_a_client_holds_its_fair_share_once_the_server_is_half_full() -> None:
    from palettelink.errors import ResourceExhausted
    from server.admission import Admission
    from server.metrics import Metrics

    m = Metrics()
    a = Admission(m, max_pending=8, shed_latency_ms=0)
    for _ in range(8):  # alone, a client keeps the whole bound
        a.admit("greedy")
    with pytest.raises(ResourceExhausted, match="--max-pending-frames"):
        a.admit("greedy")
    for _ in range(8):
        a.done(0.01, "greedy")
    a.admit("polite")  # a second client sending: the bound is split between two
    a.done(0.01, "polite")
    for _ in range(4):
        a.admit("greedy")
    with pytest.raises(ResourceExhausted, match="fair share") as e:
        a.admit("greedy")
    assert "'greedy' already has 4" in str(e.value) and e.value.retry_after_ms >= 50
    for _ in range(4):  # the polite client's frames still find room
        a.admit("polite")
    assert a.pending == 8
    text = m.render().decode()
    assert 'palettelink_frames_refused_total{reason="client_share"} 1.0' in text


# -- a server with a small bundle: frames take milliseconds, so runs of seconds say something -------


@pytest.fixture(scope="module")
def small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fall-yolov8 at 160² input, baseline codec only: the same model, ~1/16 of the work a frame."""
    from palettelink.train.build_bundle import build_bundle

    root = tmp_path_factory.mktemp("small-bundles")
    build_bundle(out_root=root, size=160, codec_assets=root / "no-codec-assets")
    return root


def _server(root: Path, fair: bool = True, **limits: object):  # noqa: ANN202 - PaletteLinkServer
    from server.auth import TokenAuth
    from server.main import PaletteLinkServer
    from server.service import Service

    svc = Service(root, [BUNDLE], verify=False, **limits)  # type: ignore[arg-type]
    svc.admission.fair_share = svc.throttle_streams = fair
    srv = PaletteLinkServer(svc, auth=TokenAuth({"polite-token": "polite", "rude-token": "rude"}))
    srv.start()
    srv.load()
    return srv


def _frames(root: Path) -> list[bytes]:
    from palettelink.bundle import find_bundle
    from palettelink.tools.loadtest import precode

    return precode(find_bundle(BUNDLE, root), "baseline", 4, None)


def _run(address: str, frames: list[bytes], seconds: float, rude_streams: int) -> dict[str, float]:
    """One polite client (2 streams at 4 fps, window 2, pausing for every retry hint) and, if asked,
    a rude one (``rude_streams`` streams, window 4, as fast as answers come, never pausing)."""
    from palettelink.tools.loadtest import LoadStream

    class Rude(LoadStream):
        def _result(self, r: pb.FrameResult) -> None:
            super()._result(r)
            self._pause_until = 0.0  # ignores the hint: the next frame goes at once

    polite_md = (("authorization", "Bearer polite-token"),)
    rude_md = (("authorization", "Bearer rude-token"),)
    with grpc.insecure_channel(address) as ch1, grpc.insecure_channel(address) as ch2:
        streams = [LoadStream(ch1, i, BUNDLE, frames, 2, 4.0, polite_md, 30) for i in range(2)]
        rude = [Rude(ch2, 100 + i, BUNDLE, frames, 4, 0.0, rude_md, 30) for i in range(rude_streams)]
        until = time.monotonic() + seconds
        threads = [threading.Thread(target=s.run, args=(until, 10.0)) for s in streams + rude]
        for t in threads:
            t.start()
        for t in threads:
            t.join(seconds + 60)
    return {"polite": sum(s.stats.answered for s in streams) / seconds,
            "polite_refused": sum(sum(s.stats.refused.values()) for s in streams) / seconds,
            "rude": sum(s.stats.answered for s in rude) / seconds,
            "rude_refused": sum(sum(s.stats.refused.values()) for s in rude) / seconds}


def test_a_rude_client_does_not_starve_a_polite_one(small_root: Path) -> None:
    """The polite client's answers per second with a rude client beside it stay within 20 % of its
    answers alone; printed with the same run without the fair share and the stream throttling (what
    happened before)."""
    limits = {"max_pending": 8, "max_batch": 4, "batch_wait_ms": 5, "shed_latency_ms": 0}
    frames = _frames(small_root)
    seconds = 12.0
    srv = _server(small_root, **limits)
    try:
        alone = _run(srv.grpc_address, frames, seconds, 0)
        shared = _run(srv.grpc_address, frames, seconds, 8)
        metrics = httpx.get(srv.http_url + "/metrics", timeout=30,
                            headers={"authorization": "Bearer polite-token"}).text
    finally:
        srv.stop(grace=1.0)
    srv = _server(small_root, fair=False, **limits)
    try:
        unfair = _run(srv.grpc_address, frames, seconds, 8)
    finally:
        srv.stop(grace=1.0)
    print(f"\nanswers/s, polite alone {alone['polite']:.2f}; beside a rude client with the fair share: "
          f"polite {shared['polite']:.2f} (refused {shared['polite_refused']:.2f}/s), rude "
          f"{shared['rude']:.2f} (refused {shared['rude_refused']:.2f}/s); without it: polite "
          f"{unfair['polite']:.2f} (refused {unfair['polite_refused']:.2f}/s), rude {unfair['rude']:.2f}")
    assert alone["polite"] > 4, alone  # 2 streams at 4 fps: the server keeps up when alone
    assert shared["rude"] > 0  # the rude client is served too, within its share
    assert shared["polite"] >= 0.8 * alone["polite"], (alone, shared)
    assert 'palettelink_frames_refused_total{reason="client_share"}' in metrics


# -- a stream that keeps sending while it is refused ------------------------------------------------


def test_a_stream_refused_again_and_again_is_left_unread_longer_each_time(bundles_root: Path,
                                                                          coded_frames) -> None:  # noqa: ANN001
    """One frame admitted at a time, frames that take ~0.5 s: a stream that sends 8 frames at once is
    not answered a refusal per frame as fast as it can send, it is left unread for the hint, then twice
    that, and so on (HTTP/2 flow control holds the sender); every frame still gets exactly one
    answer, and each refusal's hint says how long the stream is held."""
    srv = _server(bundles_root, max_pending=1, max_batch=1, shed_latency_ms=0)
    try:
        with grpc.insecure_channel(srv.grpc_address) as ch:
            def gen() -> Iterator[pb.StreamRequest]:
                yield pb.StreamRequest(header=pb.StreamHeader(bundle=BUNDLE, client_id="hasty"))
                for fid in range(8):
                    yield pb.StreamRequest(frame=pb.Frame(frame_id=fid, payload=coded_frames["zidane"]))

            t0 = time.monotonic()
            out = []
            for resp in palettelink_pb2_grpc.PaletteLinkStub(ch).Stream(
                    gen(), timeout=120, metadata=[("authorization", "Bearer rude-token")]):
                out.append((time.monotonic() - t0, resp.result))
        for t, r in out:
            what = f"refused, hint {r.error.retry_after_ms} ms" if r.HasField("error") else "answered"
            print(f"{t:6.2f} s  frame {r.frame_id}: {what}")
        assert sorted(r.frame_id for _, r in out) == list(range(8))
        refused = [(t, r) for t, r in out if r.HasField("error")]
        assert refused and all(r.error.status == "RESOURCE_EXHAUSTED" for _, r in refused)
        hints = [r.error.retry_after_ms for _, r in refused]
        held = [r for _, r in refused if "this stream is throttled for" in r.error.message]
        assert held, [(round(t, 2), r.frame_id, r.error.message) for t, r in out]
        assert max(hints) >= 2 * min(hints), hints  # doubled for refusals in a row
        text = httpx.get(srv.http_url + "/metrics", timeout=30,
                         headers={"authorization": "Bearer rude-token"}).text
        (throttled,) = [x for x in text.splitlines() if x.startswith("palettelink_streams_throttled_total")]
        assert float(throttled.split()[-1]) >= 1, throttled
    finally:
        srv.stop(grace=1.0)


# -- all workers busy ------------------------------------------------------------------------------


def test_busy_workers_refuse_with_a_hint_and_the_flag(small_root: Path) -> None:
    """With every gRPC worker held (reflection streams kept open), the next call is refused like every
    other limit: RESOURCE_EXHAUSTED, a retry-after-ms hint, --workers named (gRPC's own limit said only
    "Concurrent RPC limit exceeded!"); once the workers are free, calls are answered again."""
    from grpc_reflection.v1alpha import reflection_pb2 as r

    from server.grpc_service import GrpcServer
    from server.service import Service

    svc = Service(small_root, [BUNDLE], max_streams=2, verify=False, warmup=False)
    svc.load()
    srv = GrpcServer(svc, workers=6)
    srv.start()
    srv.set_serving(True)
    held: list[queue.Queue[r.ServerReflectionRequest | None]] = []
    try:
        with grpc.insecure_channel(srv.address) as ch:
            reflect = ch.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                                       request_serializer=r.ServerReflectionRequest.SerializeToString,
                                       response_deserializer=r.ServerReflectionResponse.FromString)
            calls = []
            for _ in range(6):
                q: queue.Queue[r.ServerReflectionRequest | None] = queue.Queue()
                q.put(r.ServerReflectionRequest(list_services=""))
                held.append(q)
                call = reflect(iter(q.get, None), timeout=60)
                next(call)  # answered: the call holds its worker until its requests end
                calls.append(call)
            assert srv.pool.busy == 6
            stub = palettelink_pb2_grpc.PaletteLinkStub(ch)
            with pytest.raises(grpc.RpcError) as e:
                stub.GetInfo(pb.GetInfoRequest(), timeout=10)
            err = e.value
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--workers" in err.details() and "retry after" in err.details(), err.details()
            assert int(dict(err.trailing_metadata())["retry-after-ms"]) >= 1000
            with pytest.raises(grpc.RpcError) as e:
                list(stub.Stream(iter([pb.StreamRequest(header=pb.StreamHeader(bundle=BUNDLE))]), timeout=10))
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--workers" in e.value.details()
            for q in held:
                q.put(None)
            for call in calls:
                list(call)
            deadline = time.monotonic() + 10
            while srv.pool.busy and time.monotonic() < deadline:
                time.sleep(0.02)
            assert [b.name for b in stub.GetInfo(pb.GetInfoRequest(), timeout=10).bundles] == [BUNDLE]
        text = svc.metrics.render().decode()
        assert 'palettelink_streams_refused_total{reason="workers"} 1.0' in text
        assert 'palettelink_streams_total{outcome="refused"} 1.0' in text
    finally:
        for q in held:
            q.put(None)
        srv.stop(grace=0.5)
        svc.close()
