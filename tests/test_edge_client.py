"""The edge client end to end: a real ``palettelink-server`` process, the real ``palettelink-edge``
process, real sockets. Nothing of our transport is mocked."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import env, script

from palettelink.bench.metrics import Box, evaluate
from palettelink.image import letterbox, load_image

REPO = Path(__file__).resolve().parents[1]
TOKEN = "edge-test-token"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def edge(*args: str, token: str | None = TOKEN, timeout: float = 120, pre: list[str] | None = None,
         ) -> subprocess.CompletedProcess[str]:
    cmd = (pre or script("palettelink-edge")) + list(args) + (["--token", token] if token else [])
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env())


@pytest.fixture(scope="module")
def server(bundles_root: Path, server_process) -> Iterator[str]:  # noqa: ANN001
    """``palettelink-server --grpc-port 0 --http-port 0`` as a child process with a token; yields
    its gRPC address once it prints READY, and stops it with SIGTERM (it must exit 0)."""
    cmd = [*script("palettelink-server"), "--bundles", str(bundles_root), "--grpc-port", "0",
           "--http-port", "0"]
    with server_process(cmd, env(PALETTELINK_TOKENS=f"edge-test={TOKEN}"), REPO, stop_timeout=30) as ready:
        yield ready["grpc"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory, images: list[Path]) -> Path:
    """A folder with a 5-frame MJPG AVI made from bus.jpg (shifted a little each frame) and zidane.jpg."""
    folder = tmp_path_factory.mktemp("media")
    bgr = cv2.imread(str(images[0]))
    assert bgr is not None
    bgr = cv2.resize(bgr, (400, 536))
    writer = cv2.VideoWriter(str(folder / "clip.avi"), cv2.VideoWriter.fourcc(*"MJPG"), 5.0, (400, 536))
    assert writer.isOpened(), "OpenCV cannot write MJPG AVI here"
    for i in range(5):
        writer.write(np.roll(bgr, 4 * i, axis=1))
    writer.release()
    shutil.copy(images[1], folder / "zidane.jpg")
    return folder


def imported_modules(importtime_stderr: str) -> set[str]:
    """Module names from ``python -X importtime`` output."""
    return {line.rsplit("|", 1)[1].strip() for line in importtime_stderr.splitlines()
            if line.startswith("import time:") and "|" in line}


def test_streams_images_as_json_and_never_imports_torch(server: str, bundles_root: Path, bundle,  # noqa: ANN001
                                                        detector, images: list[Path]) -> None:  # noqa: ANN001
    pre = [sys.executable, "-X", "importtime", "-m", "edge.client"]
    r = edge("--server", server, "--bundle", "fall-yolov8", "--bundles", str(bundles_root),
             "--codec", "baseline", "--bits", "8", "--json", *map(str, images), pre=pre)
    assert r.returncode == 0, r.stderr[-3000:]
    mods = imported_modules(r.stderr)
    assert "grpc" in mods and "onnxruntime" in mods, "importtime output not seen"
    heavy = sorted(m for m in mods if m.split(".")[0] in ("torch", "torchvision", "ultralytics"))
    assert not heavy, f"the edge process imported {heavy[:5]}"

    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert [Path(x["source"]).name for x in recs] == ["bus.jpg", "zidane.jpg"]
    assert [x["frame_id"] for x in recs] == [0, 1]
    refs, preds = [], []
    for rec, path in zip(recs, images, strict=True):
        rgb = load_image(path)
        h, w = rgb.shape[:2]
        assert (rec["width"], rec["height"]) == (w, h)
        assert (rec["codec"], rec["level"], rec["error"]) == ("baseline", 8, None)
        assert rec["bytes"] > 100_000 and rec["bpp"] == pytest.approx(8 * rec["bytes"] / (w * h), rel=1e-3)
        assert rec["latency_ms"] > 0 and rec["server_ms"]["task_ms"] > 0 and rec["edge_ms"]["front_ms"] > 0
        assert rec["boxes"], f"no boxes for {path.name}"
        for b in rec["boxes"]:
            assert b["class_name"] in bundle.class_names and 0 < b["score"] <= 1
            x1, y1, x2, y2 = b["xyxy"]
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
        x, lb = letterbox(rgb, bundle.input_size)
        refs.append(detector.detect_image(x, lb))
        preds.append([Box(tuple(b["xyxy"]), b["class_id"], b["score"]) for b in rec["boxes"]])
    ap = evaluate(refs, preds)
    assert ap.n_reference >= 4
    assert ap.ap50 >= 0.95, f"8-bit streamed detections agree with uncompressed only at AP50 {ap.ap50:.3f}"


def test_streams_a_folder_with_a_video_as_text(server: str, bundles_root: Path, clip: Path) -> None:
    r = edge("--server", server, "--bundle", "fall-yolov8", "--bundles", str(bundles_root),
             "--codec", "baseline", "--bits", "4", "--every", "3", "--max-frames", "3", str(clip))
    assert r.returncode == 0, r.stderr[-3000:]
    heads = [line for line in r.stdout.splitlines() if not line.startswith(" ")]
    assert [h.split()[0] for h in heads] == [f"{clip}/clip.avi#0", f"{clip}/clip.avi#3", f"{clip}/zidane.jpg"]
    for h in heads:
        assert "bpp" in h and "baseline/4" in h and "box(es)" in h and "rtt" in h, h
    assert any(line.startswith("    ") for line in r.stdout.splitlines()), "no box lines printed"


def test_target_bpp_picks_the_finest_level_that_fits(server: str, bundles_root: Path,
                                                    images: list[Path]) -> None:
    r = edge("--server", server, "--bundle", "fall-yolov8", "--bundles", str(bundles_root),
             "--codec", "baseline", "--target-bpp", "4", "--json", str(images[0]))
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads(r.stdout)
    assert rec["bpp"] <= 4 and rec["level"] in range(2, 8)


def test_streams_palette_levels_when_the_bundle_has_them(server: str, bundles_root: Path, bundle,  # noqa: ANN001
                                                         images: list[Path]) -> None:
    from palettelink.codecs import available

    if "palette" not in available(bundle):
        pytest.skip("this bundle has no trained palette codec (assets/codecs/fall-yolov8 not built yet)")
    from palettelink.codecs import make_encoder

    levels = make_encoder(bundle, "palette").levels()
    sizes = {}
    three = (min(levels), (min(levels) + max(levels)) // 2, max(levels))
    for level in three:
        r = edge("--server", server, "--bundle", "fall-yolov8", "--bundles", str(bundles_root),
                 "--codec", "palette", "--level", str(level), "--json", str(images[0]))
        assert r.returncode == 0, r.stderr[-3000:]
        rec = json.loads(r.stdout)
        assert (rec["codec"], rec["level"], rec["error"]) == ("palette", level, None)
        assert isinstance(rec["boxes"], list)
        if level == min(levels):
            assert rec["boxes"], "the finest palette level must still find the people on bus.jpg"
        sizes[level] = rec["bytes"]
    assert sizes[three[2]] < sizes[three[1]] < sizes[three[0]], "a coarser level must cost fewer bytes"


def test_missing_token_is_refused_with_a_hint(server: str, bundles_root: Path, images: list[Path]) -> None:
    r = edge("--server", server, "--bundle", "fall-yolov8", "--bundles", str(bundles_root), "--codec",
             "baseline", "--bits", "2", str(images[0]), token=None)
    assert r.returncode == 4, r.stderr
    assert "UNAUTHENTICATED" in r.stderr and "--token" in r.stderr


def test_bad_inputs_are_named_and_exit_2(tmp_path: Path, bundles_root: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    bad = [str(tmp_path / "missing.jpg"), str(tmp_path / "empty"), str(tmp_path / "notes.txt")]
    r = edge("--server", "127.0.0.1:1", "--bundle", "fall-yolov8", "--bundles", str(bundles_root), *bad)
    assert r.returncode == 2
    for b in bad:
        assert b in r.stderr
    assert "no such file" in r.stderr and "no images or videos" in r.stderr and "'.txt'" in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_bundle_names_the_path_and_the_fix(tmp_path: Path, images: list[Path]) -> None:
    r = edge("--server", "127.0.0.1:1", "--bundle", "fall-yolov8", "--bundles", str(tmp_path / "nowhere"),
             str(images[0]))
    assert r.returncode == 2
    assert str(tmp_path / "nowhere") in r.stderr and "palettelink build-bundle" in r.stderr
    assert "Traceback" not in r.stderr


def test_level_outside_the_codec_exits_2(bundles_root: Path, images: list[Path]) -> None:
    r = edge("--server", "127.0.0.1:1", "--bundle", "fall-yolov8", "--bundles", str(bundles_root),
             "--codec", "baseline", "--bits", "9", str(images[0]))
    assert r.returncode == 2 and "[2, 3, 4, 5, 6, 7, 8]" in r.stderr


def test_unreachable_server_exits_3_within_seconds(bundles_root: Path, images: list[Path]) -> None:
    """Nothing listens on the port: with the default --connect-timeout (3 s) the client says so and
    exits 3 in seconds (it used to stay silent for ~42 s)."""
    port = free_port()  # nothing listens there
    t0 = time.monotonic()
    r = edge("--server", f"127.0.0.1:{port}", "--bundle", "fall-yolov8", "--bundles", str(bundles_root),
             str(images[0]), timeout=60)
    wall = time.monotonic() - t0
    assert r.returncode == 3, r.stderr
    assert f"127.0.0.1:{port}" in r.stderr and "cannot reach" in r.stderr and "connection refused" in r.stderr
    assert "Traceback" not in r.stderr
    assert wall < 15, f"took {wall:.1f} s"


def test_unresolvable_server_exits_3_with_the_name(bundles_root: Path, images: list[Path]) -> None:
    t0 = time.monotonic()
    r = edge("--server", "nonexistent.invalid:50051", "--bundle", "fall-yolov8", "--bundles",
             str(bundles_root), str(images[0]), timeout=60)
    wall = time.monotonic() - t0
    assert r.returncode == 3, r.stderr
    assert "cannot resolve" in r.stderr and "nonexistent.invalid:50051" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert wall < 15, f"took {wall:.1f} s"


def test_connect_timeout_bounds_the_wait(bundles_root: Path, images: list[Path]) -> None:
    """--connect-timeout is the whole wait for the first connection, whatever --retries says."""
    t0 = time.monotonic()
    r = edge("--server", f"127.0.0.1:{free_port()}", "--bundle", "fall-yolov8", "--bundles",
             str(bundles_root), "--retries", "8", "--connect-timeout", "0.5", str(images[0]), timeout=60)
    assert r.returncode == 3 and "within 0.5 s" in r.stderr, r.stderr
    assert time.monotonic() - t0 < 10


def test_output_into_a_closed_pipe_exits_quietly(server: str, bundles_root: Path, clip: Path) -> None:
    """The reader of stdout is gone before the first answer (``| head`` a moment later): exit 141,
    no BrokenPipeError traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    cmd = script("palettelink-edge") + ["--server", server, "--bundle", "fall-yolov8", "--bundles",
                                        str(bundles_root), "--codec", "baseline", "--bits", "2", "--json",
                                        "--token", TOKEN, str(clip / "clip.avi")]
    try:
        r = subprocess.run(cmd, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120, cwd=REPO,
                           env=env())
    finally:
        os.close(write_end)
    assert r.returncode == 141, r.stderr
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr

    piped = subprocess.run(["bash", "-c", 'set -o pipefail; "$@" | head -1; echo "rc=${PIPESTATUS[0]}" >&2',
                            "bash", *cmd], capture_output=True, text=True, timeout=120, cwd=REPO, env=env())
    assert len(piped.stdout.splitlines()) == 1 and json.loads(piped.stdout)["frame_id"] == 0
    assert "Traceback" not in piped.stderr, piped.stderr
    assert piped.stderr.strip().splitlines()[-1] in ("rc=0", "rc=141"), piped.stderr


def test_reconnects_when_the_server_restarts(server_service, bundles_root: Path, clip: Path) -> None:  # noqa: ANN001
    """Stop the server after the first answer and start it again on the same port: the client backs
    off, reconnects, re-sends what was unanswered and every frame is answered exactly once."""
    from server.main import PaletteLinkServer

    port = free_port()
    srv = PaletteLinkServer(server_service, grpc_port=port)
    srv.start()
    srv.load()
    proc = subprocess.Popen(
        script("palettelink-edge") + ["--server", f"127.0.0.1:{port}", "--bundle", "fall-yolov8",
                                      "--bundles", str(bundles_root), "--codec", "baseline",
                                      "--bits", "2", "--json", "--window", "2", str(clip / "clip.avi")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env())
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first, "no first answer"
        srv.stop(grace=0.2, close_service=False)
        time.sleep(0.5)
        srv = PaletteLinkServer(server_service, grpc_port=port)
        srv.start()
        srv.load()
        rest, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        srv.stop(grace=0.2, close_service=False)
    assert proc.returncode == 0, err
    ids = [json.loads(line)["frame_id"] for line in [first, *rest.splitlines()]]
    assert sorted(ids) == [0, 1, 2, 3, 4]
    assert "reconnected" in err


def test_mtls_with_make_certs(server_service, bundles_root: Path, tmp_path: Path,  # noqa: ANN001
                              images: list[Path]) -> None:
    """deploy/scripts/make-certs.sh certificates work for mTLS; without a client cert the handshake
    fails and the client says the server is unreachable (exit 3)."""
    from server.grpc_service import TLSConfig
    from server.main import PaletteLinkServer

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    certs = tmp_path / "certs"
    subprocess.run(["bash", str(REPO / "deploy/scripts/make-certs.sh"), str(certs)], check=True,
                   capture_output=True, timeout=60)
    tls = TLSConfig(certs / "server.crt", certs / "server.key", certs / "ca.crt")
    srv = PaletteLinkServer(server_service, grpc_port=0, tls=tls)
    srv.start()
    srv.load()
    try:
        common = ["--server", f"localhost:{srv.grpc.port}", "--bundle", "fall-yolov8", "--bundles",
                  str(bundles_root), "--codec", "baseline", "--bits", "2", "--json", "--tls-ca",
                  str(certs / "ca.crt")]
        ok = edge(*common, "--tls-cert", str(certs / "client.crt"), "--tls-key", str(certs / "client.key"),
                  str(images[0]))
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["boxes"]
        no_cert = edge(*common, "--retries", "0", "--connect-timeout", "1", str(images[0]))
        assert no_cert.returncode == 3, no_cert.stderr
        # plaintext against the TLS port: named at once, with the flag that fixes it
        t0 = time.monotonic()
        plain = edge("--server", f"localhost:{srv.grpc.port}", "--bundle", "fall-yolov8", "--bundles",
                     str(bundles_root), "--codec", "baseline", "--bits", "2", "--connect-timeout", "30",
                     str(images[0]))
        assert plain.returncode == 3 and "expects TLS" in plain.stderr and "--tls-ca" in plain.stderr, \
            plain.stderr
        assert time.monotonic() - t0 < 15
    finally:
        srv.stop(grace=0.2, close_service=False)


def test_a_frozen_server_fails_every_frame_with_a_reason_and_exit_3(bundles_root: Path, clip: Path) -> None:
    """SIGSTOP the server after the first answer: the client never hangs. Frames unanswered within
    --frame-timeout are failed (DEADLINE_EXCEEDED), the stream re-opened, and when --retries is spent
    every remaining input still gets exactly one --json record (failed, with the reason); exit 3."""
    proc = subprocess.Popen(
        [*script("palettelink-server"), "--bundles", str(bundles_root), "--grpc-port", "0",
         "--http-port", "0", "--no-verify"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env())
    client = None
    try:
        assert proc.stdout is not None
        address = None
        for line in proc.stdout:
            if line.startswith("READY "):
                address = dict(f.split("=", 1) for f in line.split()[1:] if "=" in f)["grpc"]
                break
        assert address, "server did not get READY"
        video = str(clip / "clip.avi")
        client = subprocess.Popen(
            script("palettelink-edge") + ["--server", address, "--bundle", "fall-yolov8", "--bundles",
                                          str(bundles_root), "--codec", "baseline", "--bits", "2", "--json",
                                          "--frame-timeout", "2", "--retries", "1", *[video] * 4],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env())
        assert client.stdout is not None
        first = client.stdout.readline()
        assert first, "no first answer"
        proc.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        rest, err = client.communicate(timeout=60)
        wall = time.monotonic() - t0
    finally:
        if client is not None and client.poll() is None:
            client.kill()
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait()
    assert client.returncode == 3, err
    assert wall < 15, f"the client took {wall:.1f} s after the server froze"
    recs = [json.loads(line) for line in [first, *rest.splitlines()]]
    assert sorted(r["frame_id"] for r in recs) == list(range(20))  # each input once, none lost
    failed = [r for r in recs if r["error"]]
    assert failed, "the server froze after the first answer, yet nothing failed"
    assert {r["error"]["status"] for r in failed} <= {"DEADLINE_EXCEEDED", "UNAVAILABLE"}
    assert any("--frame-timeout" in r["error"]["message"] for r in failed)
    assert all(r["error"]["message"] for r in failed)
    assert "could not reconnect" in err and "Traceback" not in err
