"""One record per input frame, in every outcome (issue 20): the real ``palettelink-edge --json`` process
against servers that answer, refuse, shed, fail frames, break the stream mid-way, never answer, or are
not there. Each case checks the records (one per input, ids unique, the outcome of each), that the
stderr summary counts the same records, and the exit code the README documents.

The real ``palettelink-server`` gives the token refusal and latency shedding. The faults a healthy
server never produces on demand (INTERNAL mid-stream, a stream closed with frames unanswered, a
frame error) come from a scripted server: a real gRPC server on 127.0.0.1 speaking the real proto,
whose ``Stream`` handler follows a script. The client, its transport and codec are the real ones."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
from helpers import env, script

from palettelink.v1 import palettelink_pb2 as pb
from palettelink.v1 import palettelink_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TOKEN = "records-test-token"
N = 5


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, images: list[Path]) -> list[str]:
    """N small distinct images (fast to code: the front still runs at the bundle's input size)."""
    d = tmp_path_factory.mktemp("records")
    bgr = cv2.resize(cv2.imread(str(images[0])), (96, 128))
    paths = []
    for i in range(N):
        p = d / f"in{i}.png"
        assert cv2.imwrite(str(p), np.roll(bgr, 3 * i, axis=1))
        paths.append(str(p))
    return paths


def edge(server: str, bundles_root: Path, paths: list[str], *flags: str, token: str | None = TOKEN,
         timeout: float = 180) -> subprocess.CompletedProcess[str]:
    cmd = script("palettelink-edge") + ["--server", server, "--bundle", "fall-yolov8", "--bundles",
                                        str(bundles_root), "--codec", "baseline", "--bits", "2", "--json",
                                        *flags, *paths] + (["--token", token] if token else [])
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env())


def records(r: subprocess.CompletedProcess[str], paths: list[str]) -> list[dict]:
    """The --json records: exactly one per input, ids unique, and the stderr summary agrees."""
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["source"] for x in sorted(recs, key=lambda x: x["frame_id"])] == paths, (r.stdout, r.stderr)
    assert len({x["frame_id"] for x in recs}) == len(recs)
    failed = [x for x in recs if x["error"]]
    assert all((x["outcome"] == "ok") == (x["error"] is None) for x in recs)
    m = re.search(r"(\d+) of (\d+) frame\(s\) failed \(([^)]*)\)", r.stderr)
    if failed:
        assert m, r.stderr
        assert (int(m.group(1)), int(m.group(2))) == (len(failed), len(recs)), r.stderr
        parts = re.findall(r"(\d+) ([a-z ]+?)(?:,|$)", m.group(3))
        said = {kind.replace(" ", "_"): int(n) for n, kind in parts}
        seen: dict[str, int] = {}
        for x in failed:
            seen[x["outcome"]] = seen.get(x["outcome"], 0) + 1
        assert said == seen, (said, seen, r.stderr)
    else:
        assert not m, r.stderr
    for x in failed:
        assert x["error"]["status"] and x["error"]["message"], x
    return recs


def outcomes(recs: list[dict]) -> list[str]:
    return [x["outcome"] for x in sorted(recs, key=lambda x: x["frame_id"])]


# -- a scripted gRPC server --------------------------------------------------------------------


Script = Callable[[int, pb.Frame, grpc.ServicerContext], "pb.FrameResult | None"]


class Scripted(pb_grpc.PaletteLinkServicer):
    """``Stream`` answers each frame with ``script(n, frame, context)`` (n counts frames from 0 over
    all streams); None sends nothing; the script may abort the call."""

    def __init__(self, script_: Script, before: Callable[[grpc.ServicerContext], None] | None = None) -> None:
        self.script, self.before, self.n = script_, before, 0

    def Stream(self, request_iterator: Iterator[pb.StreamRequest],  # noqa: N802
               context: grpc.ServicerContext) -> Iterator[pb.StreamResponse]:
        if self.before is not None:
            self.before(context)
        for req in request_iterator:
            if req.WhichOneof("msg") != "frame":
                continue
            n, self.n = self.n, self.n + 1
            res = self.script(n, req.frame, context)
            if res is not None:
                yield pb.StreamResponse(result=res)


def ok(frame: pb.Frame) -> pb.FrameResult:
    return pb.FrameResult(frame_id=frame.frame_id, codec="baseline", level=2,
                          payload_bytes=len(frame.payload),
                          boxes=[pb.Box(x1=1, y1=2, x2=30, y2=40, score=0.9, class_id=0)])


def error(frame: pb.Frame, status: grpc.StatusCode, message: str, retry_after_ms: int = 0) -> pb.FrameResult:
    return pb.FrameResult(frame_id=frame.frame_id, payload_bytes=len(frame.payload), error=pb.FrameError(
        code=status.value[0], status=status.name, message=message, retry_after_ms=retry_after_ms))


@pytest.fixture()
def scripted() -> Iterator[Callable[..., str]]:
    servers: list[grpc.Server] = []

    def start(script_: Script, before: Callable[[grpc.ServicerContext], None] | None = None) -> str:
        srv = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        pb_grpc.add_PaletteLinkServicer_to_server(Scripted(script_, before), srv)
        port = srv.add_insecure_port("127.0.0.1:0")
        srv.start()
        servers.append(srv)
        return f"127.0.0.1:{port}"

    yield start
    for s in servers:
        s.stop(0)


def test_all_answered(scripted, bundles_root: Path, inputs: list[str]) -> None:  # noqa: ANN001
    r = edge(scripted(lambda n, f, c: ok(f)), bundles_root, inputs)
    assert r.returncode == 0, r.stderr
    assert outcomes(records(r, inputs)) == ["ok"] * N


def test_frame_errors_and_refusals_are_answers(scripted, bundles_root: Path, inputs: list[str]) -> None:  # noqa: ANN001
    """Frame 1 fails, frame 3 is refused under load every time it is sent (re-sent after the hint, 3
    times, then its refusal is its record): one record each, exit 1."""
    def script_(n: int, f: pb.Frame, c: grpc.ServicerContext) -> pb.FrameResult:
        if f.frame_id == 1:
            return error(f, grpc.StatusCode.INVALID_ARGUMENT, "cannot decode")
        if f.frame_id == 3:
            return error(f, grpc.StatusCode.RESOURCE_EXHAUSTED, "4 frames already waiting", retry_after_ms=20)
        return ok(f)

    r = edge(scripted(script_), bundles_root, inputs)
    assert r.returncode == 1, r.stderr
    assert outcomes(records(r, inputs)) == ["ok", "failed", "ok", "refused", "ok"]
    assert "re-sent after its retry hint" in r.stderr


def test_internal_mid_stream_fails_the_rest_once_each_and_exits_1(scripted, bundles_root: Path,  # noqa: ANN001
                                                                  inputs: list[str]) -> None:
    """The server answers frame 0, then aborts the call with INTERNAL: the frames in flight are not
    answered, the others not sent; one record each. Exit 1 (frames failed), as documented, not 4
    (a refusal: it used to exit 4)."""
    def script_(n: int, f: pb.Frame, c: grpc.ServicerContext) -> pb.FrameResult | None:
        if n == 0:
            return ok(f)
        time.sleep(0.2)  # the client has its window full by now
        c.abort(grpc.StatusCode.INTERNAL, "tail crashed")
        return None

    r = edge(scripted(script_), bundles_root, inputs)
    got = outcomes(records(r, inputs))
    assert r.returncode == 1, r.stderr
    assert got[0] == "ok" and "not_answered" in got and set(got[1:]) <= {"not_answered", "not_sent"}
    assert "the server broke the stream: INTERNAL: tail crashed" in r.stderr


def test_a_stream_closed_with_frames_unanswered(scripted, bundles_root: Path, inputs: list[str]) -> None:  # noqa: ANN001
    """The server ends the call (status OK) after answering frame 0, frames still in flight."""
    class Closing(Scripted):
        def Stream(self, request_iterator, context):  # noqa: ANN001, ANN201, N802
            for req in request_iterator:
                if req.WhichOneof("msg") == "frame":
                    yield pb.StreamResponse(result=ok(req.frame))
                    time.sleep(0.3)
                    return

    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_PaletteLinkServicer_to_server(Closing(lambda n, f, c: None), srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    try:
        r = edge(f"127.0.0.1:{port}", bundles_root, inputs)
    finally:
        srv.stop(0)
    got = outcomes(records(r, inputs))
    assert r.returncode == 1, r.stderr
    assert got[0] == "ok" and "not_answered" in got and set(got[1:]) <= {"not_answered", "not_sent"}
    assert "INTERNAL" in r.stderr and "unanswered" in r.stderr


def test_a_server_that_never_answers(scripted, bundles_root: Path, inputs: list[str]) -> None:  # noqa: ANN001
    """No answer within --frame-timeout, no retries left: the frames in flight are not answered
    (DEADLINE_EXCEEDED), the rest not sent; exit 3 (the server is lost)."""
    r = edge(scripted(lambda n, f, c: None), bundles_root, inputs, "--frame-timeout", "1", "--retries", "0")
    got = outcomes(records(r, inputs))
    assert r.returncode == 3, r.stderr
    assert "not_answered" in got and set(got) <= {"not_answered", "not_sent"}


def test_a_scripted_refusal_at_the_door(scripted, bundles_root: Path, inputs: list[str]) -> None:  # noqa: ANN001
    def before(c: grpc.ServicerContext) -> None:
        c.abort(grpc.StatusCode.PERMISSION_DENIED, "this token may not use fall-yolov8")

    r = edge(scripted(lambda n, f, c: ok(f), before), bundles_root, inputs)
    got = outcomes(records(r, inputs))
    assert r.returncode == 4, r.stderr
    assert set(got) <= {"not_answered", "not_sent"}
    assert "server refused the stream: PERMISSION_DENIED" in r.stderr


# -- the real server and no server --------------------------------------------------------------


@pytest.fixture(scope="module")
def real_server(bundles_root: Path, server_process) -> Iterator[str]:  # noqa: ANN001
    """``palettelink-server`` with a token and hair-trigger latency shedding: one frame admitted at a
    time once a frame took over 1 ms, the rest refused with a retry hint."""
    cmd = [*script("palettelink-server"), "--bundles", str(bundles_root), "--grpc-port", "0", "--http-port",
           "0", "--no-verify", "--max-pending-frames", "1", "--shed-latency-ms", "1", "--max-batch", "1"]
    with server_process(cmd, env(PALETTELINK_TOKENS=f"records={TOKEN}"), REPO, stop_timeout=30) as ready:
        yield ready["grpc"]


def test_a_missing_token_gives_one_record_per_input(real_server: str, bundles_root: Path,
                                                    inputs: list[str]) -> None:
    """It used to print 2 records for 1 input ("2 of 2 frame(s) failed"), 6 for 5."""
    for paths in (inputs[:1], inputs):
        r = edge(real_server, bundles_root, paths, token=None)
        got = outcomes(records(r, paths))
        assert r.returncode == 4, r.stderr
        assert set(got) <= {"not_answered", "not_sent"}
        assert "UNAUTHENTICATED" in r.stderr and "--token" in r.stderr
        assert f"{len(paths)} of {len(paths)} frame(s) failed" in r.stderr


def test_shed_frames_have_one_record_each(real_server: str, bundles_root: Path, inputs: list[str]) -> None:
    """Frames the server sheds are re-sent after its hint; each still gets one record (answered, or
    refused once its re-sends are spent)."""
    r = edge(real_server, bundles_root, inputs, "--window", "4", timeout=300)
    got = outcomes(records(r, inputs))
    assert "re-sent after its retry hint" in r.stderr, r.stderr  # the server did shed
    assert set(got) <= {"ok", "refused"} and "ok" in got
    assert r.returncode == (1 if "refused" in got else 0), r.stderr


def test_a_dead_port_gives_every_input_a_record(bundles_root: Path, inputs: list[str]) -> None:
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    t0 = time.monotonic()
    r = edge(f"127.0.0.1:{port}", bundles_root, inputs, "--connect-timeout", "1")
    got = outcomes(records(r, inputs))
    assert r.returncode == 3, r.stderr
    assert got == ["not_sent"] * N
    assert f"127.0.0.1:{port}" in r.stderr and "connection refused" in r.stderr
    assert time.monotonic() - t0 < 30
