"""``palettelink-server`` as a real subprocess: READY line, both ports answering, clean SIGTERM."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest

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
    time.sleep(0.2)  # let the stdout pump finish
    assert not any(lines.get().startswith("LISTENING") for _ in range(lines.qsize()))  # before listening


def _copy_bundle(src: Path, dest: Path, edit: dict[str, object] | None = None) -> Path:
    """A copy of the bundle folder ``src`` (hard links: the files are big), its manifest ``edit``-ed
    by hand (a new file: the original is not touched)."""
    shutil.copytree(src, dest, copy_function=os.link)
    if edit:
        m = json.loads((dest / "manifest.json").read_text())
        m.update(edit)
        (dest / "manifest.json").unlink()
        (dest / "manifest.json").write_text(json.dumps(m, indent=2))
    return dest


def _run_merged(*args: str, timeout: float = 120) -> tuple[subprocess.Popen[str], list[str], threading.Event]:
    """The server with stderr and stdout in one pipe (their order as printed); lines collected."""
    proc = subprocess.Popen([sys.executable, "-m", "server.main", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.append(line)
            if line.startswith("READY "):
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    return proc, out, ready


def test_bundle_errors_come_before_listening(bundles_root: Path, tmp_path: Path) -> None:
    """A broken bundle beside a good one: its error is one line before LISTENING (not among the log
    lines after it), and the server goes on with the good one."""
    good = bundles_root / "fall-yolov8" / "1"
    _copy_bundle(good, tmp_path / "fall-yolov8" / "1")
    bad = _copy_bundle(good, tmp_path / "fall-yolov8" / "2",
                       {"version": "2", "class_names": ["Fall", "Normal"]})
    proc, out, ready = _run_merged("--bundles", str(tmp_path), "--grpc-port", "0", "--http-port", "0",
                                   "--log-level", "info")
    try:
        assert ready.wait(120), "".join(out)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, "".join(out)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    time.sleep(0.2)
    errors = [i for i, line in enumerate(out) if "not loaded" in line]
    listening = next(i for i, line in enumerate(out) if line.startswith("LISTENING "))
    assert len(errors) == 1 and errors[0] < listening, "".join(out)
    line = out[errors[0]]
    assert line.startswith(f"palettelink-server: bundle {bad} not loaded: manifest.json was edited"), line
    assert "bundles=fall-yolov8/1" in next(x for x in out if x.startswith("READY ")), "".join(out)


def test_a_server_whose_only_bundle_has_an_edited_manifest_exits_2(bundles_root: Path,
                                                                   tmp_path: Path) -> None:
    """Swapped class names in manifest.json: refused at start-up like an edited file, in one line,
    exit 2, and the ports never answer (no LISTENING)."""
    bad = _copy_bundle(bundles_root / "fall-yolov8" / "1", tmp_path / "fall-yolov8" / "1",
                       {"class_names": ["Fall", "Normal"]})
    proc = subprocess.run([sys.executable, "-m", "server.main", "--bundles", str(tmp_path), "--grpc-port",
                           "0", "--http-port", "0"], cwd=ROOT, text=True, capture_output=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert not any(x.startswith(("LISTENING", "READY")) for x in proc.stdout.splitlines()), proc.stdout
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("palettelink-server: no usable bundle under"), line
    assert f"{bad}: manifest.json was edited since the bundle was written" in line, line
    assert "Traceback" not in proc.stderr


def _refused_to_start(proc: subprocess.Popen[str], lines: queue.Queue[str], flag: str) -> str:
    """The process exits 3 with one line on stderr naming the flag, and never prints LISTENING/READY."""
    try:
        assert proc.wait(timeout=60) == 3
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.stderr is not None
    err = proc.stderr.read()
    assert "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert flag in err and "taken" in err, err
    time.sleep(0.2)  # let the stdout pump finish
    out = []
    while not lines.empty():
        out.append(lines.get())
    assert not any(x.startswith(("LISTENING", "READY")) for x in out), out
    return err


def _listening_socket() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def test_server_refuses_a_grpc_port_held_by_a_plain_socket(tmp_path: Path) -> None:
    with _listening_socket() as s:
        port = s.getsockname()[1]
        proc, lines = start("--bundles", str(tmp_path), "--grpc-port", str(port), "--http-port", "0")
        err = _refused_to_start(proc, lines, "--grpc-port")
    assert f"127.0.0.1:{port}" in err


def test_server_refuses_an_http_port_held_by_a_plain_socket(tmp_path: Path) -> None:
    with _listening_socket() as s:
        port = s.getsockname()[1]
        proc, lines = start("--bundles", str(tmp_path), "--grpc-port", "0", "--http-port", str(port))
        err = _refused_to_start(proc, lines, "--http-port")
    assert f"127.0.0.1:{port}" in err


def test_a_second_server_on_the_same_ports_refuses_to_start(tmp_path: Path) -> None:
    """Before, gRPC's default SO_REUSEPORT let the second server bind the first one's gRPC port and
    print READY too (each then got half the connections); an HTTP clash was a traceback."""
    from server.main import PaletteLinkServer
    from server.service import Service

    first = PaletteLinkServer(Service(tmp_path))
    first.start()
    try:
        root = str(tmp_path)
        proc, lines = start("--bundles", root, "--grpc-port", str(first.grpc.port), "--http-port", "0")
        _refused_to_start(proc, lines, "--grpc-port")
        proc, lines = start("--bundles", root, "--grpc-port", "0", "--http-port", str(first.http_port))
        _refused_to_start(proc, lines, "--http-port")
    finally:
        first.stop(grace=0.2)


def test_grpc_server_does_not_share_its_port(tmp_path: Path) -> None:
    """The bind itself refuses (``grpc.so_reuseport`` off), not only the friendly check before it."""
    from server.grpc_service import GrpcServer
    from server.service import Service

    svc = Service(tmp_path)
    a = GrpcServer(svc, port=0)
    a.start()
    try:
        with pytest.raises((OSError, RuntimeError), match="bind"):
            GrpcServer(svc, port=a.port)
    finally:
        a.stop(0)


def test_readiness_turns_false_first_on_sigterm(bundles_root: Path, coded_frames) -> None:  # noqa: ANN001
    """SIGTERM while a stream is open: /readyz answers 503 (and health NOT_SERVING) at once, while the
    ports still answer and the stream gets its grace; then the process exits 0."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    proc, lines = start("--bundles", str(bundles_root), "--bundle", "fall-yolov8", "--grpc-port", "0",
                        "--http-port", "0", "--log-level", "warning", "--drain-grace", "3",
                        "--drain-delay", "1")
    try:
        m = re.match(r"READY grpc=(\S+) http=(\S+)", wait_for(lines, "READY ", 120))
        assert m
        grpc_addr, http_addr = m.groups()
        assert httpx.get(f"http://{http_addr}/readyz", timeout=5).status_code == 200
        with grpc.insecure_channel(grpc_addr) as ch:
            reqs: queue.Queue[pb.StreamRequest | None] = queue.Queue()
            reqs.put(pb.StreamRequest(header=pb.StreamHeader(bundle="fall-yolov8")))
            reqs.put(pb.StreamRequest(frame=pb.Frame(frame_id=1, payload=coded_frames["bus"])))
            call = palettelink_pb2_grpc.PaletteLinkStub(ch).Stream(iter(reqs.get, None), timeout=30)
            assert next(call).result.frame_id == 1  # the stream is open and answering
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            while httpx.get(f"http://{http_addr}/readyz", timeout=1).status_code == 200:
                assert time.monotonic() - t0 < 1.0, "/readyz still 200 a second after SIGTERM"
                time.sleep(0.02)
            st = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
            assert st.status == health_pb2.HealthCheckResponse.NOT_SERVING
            seen: list[int] = []
            while proc.poll() is None and time.monotonic() - t0 < 10:
                try:
                    seen.append(httpx.get(f"http://{http_addr}/readyz", timeout=1).status_code)
                except httpx.HTTPError:
                    break
                time.sleep(0.1)
            assert seen and set(seen) == {503}, seen  # never 200 again once the drain started
            assert len(seen) >= 5  # the HTTP side kept answering through the grace period
            reqs.put(None)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.stderr is not None
    err = proc.stderr.read()
    assert "Traceback" not in err, err


@pytest.mark.parametrize("args, says", [
    (["--workers", "10", "--max-streams", "64"], "--workers 10 must be at least --max-streams + 4 = 68"),
    (["--max-streams-per-client", "0"], "--max-streams-per-client must be ≥ 1"),
    (["--stream-idle-timeout", "0"], "--stream-idle-timeout and --header-timeout must be > 0"),
    (["--preview-frames", "-1"], "--preview-frames and --preview-mb must be ≥ 0"),
])
def test_limit_flags_that_do_not_fit_exit_2(tmp_path: Path, args: list[str], says: str) -> None:
    r = subprocess.run([sys.executable, "-m", "server.main", "--bundles", str(tmp_path), *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert says in r.stderr and "Traceback" not in r.stderr


def test_preview_flags_bound_the_services_store() -> None:
    from server.main import _preview_limits, build_parser

    assert _preview_limits(build_parser().parse_args([])) == {}  # the Service's defaults
    args = build_parser().parse_args(["--preview-frames", "4", "--preview-mb", "2"])
    assert _preview_limits(args) == {"preview_frames": 4, "preview_bytes": 2 << 20}
