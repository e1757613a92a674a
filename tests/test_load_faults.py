"""Fault tests (issue 10, item 4): a real ``palettelink-server`` process, the real ``palettelink-edge``
client with ``--json``; the server is SIGKILLed mid-stream and restarted on the same port, or frozen
with SIGSTOP and thawed with SIGCONT. The client's accounting must show every frame delivered or
failed with a reason, each exactly once, none duplicated."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import pytest
from helpers import script

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
N_FRAMES = 12


def env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PALETTELINK_TOKEN", "PALETTELINK_TOKENS")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProc:
    """``palettelink-server`` on a fixed gRPC port, started again on the same port after a kill."""

    def __init__(self, bundles_root: Path) -> None:
        self.root = bundles_root
        self.port = free_port()
        self.proc: subprocess.Popen[str] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> None:
        self.proc = subprocess.Popen(
            [*script("palettelink-server"), "--bundles", str(self.root), "--grpc-port", str(self.port),
             "--http-port", "0", "--no-verify", "--max-batch", "2"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env())
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("READY "):
                # keep reading its log, so a full pipe never blocks it
                threading.Thread(target=self.proc.stdout.read, daemon=True).start()
                return
        pytest.fail(f"palettelink-server exited {self.proc.wait()} before READY")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def server(bundles_root: Path) -> Iterator[ServerProc]:
    s = ServerProc(bundles_root)
    s.start()
    yield s
    s.kill()


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory, images: list[Path]) -> Path:
    """A 12-frame MJPG AVI made from bus.jpg, shifted a little each frame."""
    path = tmp_path_factory.mktemp("faults") / "clip.avi"
    bgr = cv2.resize(cv2.imread(str(images[0])), (400, 536))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 5.0, (400, 536))
    assert writer.isOpened()
    for i in range(N_FRAMES):
        writer.write(cv2.warpAffine(bgr, cv2.getRotationMatrix2D((200, 268), 0, 1.0) + [[0, 0, i], [0, 0, 0]],
                                    (400, 536)))
    writer.release()
    return path


def edge_client(server: ServerProc, bundles_root: Path, clip: Path, *flags: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        script("palettelink-edge") + ["--server", server.address, "--bundle", "fall-yolov8", "--bundles",
                                      str(bundles_root), "--codec", "baseline", "--bits", "2", "--json",
                                      "--window", "2", *flags, str(clip)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env())


def accounted(lines: list[str]) -> tuple[list[dict], list[dict]]:
    """Every frame once (ids 0..N-1, none duplicated); returns (delivered, failed-with-a-reason)."""
    recs = [json.loads(line) for line in lines if line.strip()]
    ids = [r["frame_id"] for r in recs]
    assert len(ids) == len(set(ids)), f"duplicated frames: {sorted(ids)}"
    assert sorted(ids) == list(range(N_FRAMES)), sorted(ids)
    delivered = [r for r in recs if r["error"] is None]
    failed = [r for r in recs if r["error"] is not None]
    for r in failed:
        assert r["error"]["status"] and r["error"]["message"], r
    for r in delivered:
        assert r["codec"] == "baseline" and r["server_ms"]["total_ms"] > 0
    return delivered, failed


def test_sigkill_mid_stream_and_restart_on_the_same_port(server: ServerProc, bundles_root: Path,
                                                        clip: Path) -> None:
    """kill -9 after the first answer, start it again: the client backs off, reconnects, re-sends the
    unanswered frames; every frame is answered exactly once."""
    client = edge_client(server, bundles_root, clip, "--retries", "30", "--frame-timeout", "60")
    try:
        assert client.stdout is not None
        first = client.stdout.readline()
        assert first, "no first answer"
        server.signal(signal.SIGKILL)
        server.proc.wait()  # type: ignore[union-attr]
        time.sleep(0.5)
        server.start()
        rest, err = client.communicate(timeout=240)
    finally:
        if client.poll() is None:
            client.kill()
    delivered, failed = accounted([first, *rest.splitlines()])
    assert client.returncode == 0, err
    assert len(delivered) == N_FRAMES and not failed
    assert "reconnected" in err


def test_sigstop_then_sigcont_every_frame_delivered_or_failed_with_a_reason(server: ServerProc,
                                                                           bundles_root: Path,
                                                                           clip: Path) -> None:
    """Frozen for 5 s with --frame-timeout 2: the frames in flight fail (DEADLINE_EXCEEDED, with the
    reason), the stream is re-opened, and once thawed the rest is delivered; late answers of the old
    stream are not counted twice."""
    client = edge_client(server, bundles_root, clip, "--retries", "10", "--frame-timeout", "2")
    try:
        assert client.stdout is not None
        first = client.stdout.readline()
        assert first, "no first answer"
        server.signal(signal.SIGSTOP)
        time.sleep(5)
        server.signal(signal.SIGCONT)
        rest, err = client.communicate(timeout=240)
    finally:
        server.signal(signal.SIGCONT)
        if client.poll() is None:
            client.kill()
    delivered, failed = accounted([first, *rest.splitlines()])
    assert client.returncode in (0, 1), err
    assert failed, "nothing timed out while the server was frozen"
    assert all(r["error"]["status"] == "DEADLINE_EXCEEDED" for r in failed), failed
    assert len(delivered) + len(failed) == N_FRAMES and len(delivered) > 1
