"""``palettelink-server`` as a real subprocess: READY line, both ports answering, clean SIGTERM."""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx

from palettelink.v1 import palettelink_pb2 as pb
from palettelink.v1 import palettelink_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]


def start(*args: str) -> tuple[subprocess.Popen[str], queue.Queue[str]]:
    proc = subprocess.Popen([sys.executable, "-m", "server.main", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return proc, lines


def wait_for(lines: queue.Queue[str], prefix: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            continue
        if line.startswith(prefix):
            return line
    raise AssertionError(f"no {prefix!r} line within {timeout} s")


def test_server_process_serves_and_stops_on_sigterm(bundles_root: Path, coded_frames) -> None:  # noqa: ANN001
    proc, lines = start("--bundles", str(bundles_root), "--bundle", "fall-yolov8", "--grpc-port", "0",
                        "--http-port", "0", "--host", "127.0.0.1", "--log-level", "warning")
    try:
        ready = wait_for(lines, "READY ", 120)
        m = re.match(r"READY grpc=(\S+) http=(\S+) bundles=(\S+)", ready)
        assert m, ready
        grpc_addr, http_addr, bundles = m.groups()
        assert bundles == "fall-yolov8/1"
        assert httpx.get(f"http://{http_addr}/readyz", timeout=10).status_code == 200
        with grpc.insecure_channel(grpc_addr) as ch:
            stub = palettelink_pb2_grpc.PaletteLinkStub(ch)
            assert [b.name for b in stub.GetInfo(pb.GetInfoRequest(), timeout=10).bundles] == ["fall-yolov8"]
            assert stub.Analyze(pb.AnalyzeRequest(payload=coded_frames["bus"]), timeout=60).result.boxes
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.stderr is not None
    err = proc.stderr.read()
    assert "Traceback" not in err, err


def test_server_process_without_bundles_exits_2(tmp_path: Path) -> None:
    proc, lines = start("--bundles", str(tmp_path), "--grpc-port", "0", "--http-port", "0")
    try:
        assert proc.wait(timeout=60) == 2
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.stderr is not None
    assert "no usable bundle" in proc.stderr.read()
