"""``palettelink loadtest`` (issue 10, item 4), short: 8 streams x 5 s against the real in-process server
(live_server): every frame answered once, in order, none lost; RSS read from /metrics and /proc."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import ABSENT_PRELUDE

from palettelink.tools import loadtest


def test_eight_streams_five_seconds_nothing_lost_duplicated_or_reordered(live_server, coded_frames) -> None:  # noqa: ANN001
    frames = list(coded_frames.values())
    rep = loadtest.loadtest(live_server.grpc_address, "fall-yolov8", frames, streams=8, seconds=5, window=2,
                            drain=120, server_pid=os.getpid(), rss_every=0.5)
    print(loadtest.format_report(rep))
    assert rep["sent"] > 0 and rep["answered"] > 0
    assert rep["lost"] == 0, rep["lost_by_reason"]
    assert rep["duplicated"] == 0 and rep["out_of_order"] == 0
    assert rep["sent"] == rep["answered"] + rep["refused"] + rep["lost"]
    assert not rep["stream_errors"]
    assert rep["streams_opened"] == 8
    assert rep["latency_ms"]["p50"] <= rep["latency_ms"]["p95"] <= rep["latency_ms"]["p99"]
    assert rep["rss_mb"] and rep["rss_mb"]["start"] > 0 and len(rep["rss_mb"]["samples"]) >= 5


def test_cli_paces_streams_and_reads_rss_from_metrics(live_server, bundles_root: Path, tmp_path: Path,  # noqa: ANN001
                                                      capsys) -> None:  # noqa: ANN001
    from palettelink.cli import main

    out = tmp_path / "load.json"
    rc = main(["loadtest", "--server", live_server.grpc_address, "--streams", "3", "--seconds", "3",
               "--fps", "1", "--bundles", str(bundles_root), "--codec", "baseline", "--level", "2", "--http",
               live_server.http_url, "--rss-every", "0.5", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    for word in ("sent", "answered", "refused", "lost", "duplicated", "out of order", "p95", "server RSS MB"):
        assert word in text, (word, text)
    rep = json.loads(out.read_text())
    assert rep["lost"] == rep["duplicated"] == rep["out_of_order"] == 0
    assert 3 <= rep["sent"] <= 3 * 4  # 1 frame/s per stream for 3 s
    assert rep["rss_mb"]["max"] > 100


def test_bad_arguments_exit_2(capsys) -> None:  # noqa: ANN001
    from palettelink.cli import main

    assert main(["loadtest", "--server", "127.0.0.1:1", "--streams", "0"]) == 2


# -- issue 20: no --images on an install without ultralytics, and errors on one line -----------

ABSENT = ABSENT_PRELUDE


def _loadtest(*args: str, shim: Path | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PALETTELINK_")}
    if shim is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(shim), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([sys.executable, "-m", "palettelink.cli", "loadtest", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=Path(__file__).resolve().parents[1], env=env)


def test_without_images_it_sends_the_shipped_samples(live_server, bundles_root: Path,  # noqa: ANN001
                                                     tmp_path: Path) -> None:
    """On an install without ultralytics (the edge install) it used to print ZeroDivisionError
    tracebacks and exit 0: now the sample images that ship with the package are coded."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(ABSENT)
    out = tmp_path / "load.json"
    r = _loadtest("--server", live_server.grpc_address, "--streams", "2", "--seconds", "2", "--bundles",
                  str(bundles_root), "--codec", "baseline", "--level", "2", "--json", str(out), shim=shim)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "ZeroDivisionError" not in r.stderr, r.stderr
    assert "2 frames coded once" in r.stdout, r.stdout
    rep = json.loads(out.read_text())
    assert rep["frames"] == 2 and rep["sent"] > 0 and rep["lost"] == 0


def test_a_wrong_port_is_one_line_and_exit_2(bundles_root: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = _loadtest("--server", f"127.0.0.1:{port}", "--streams", "2", "--seconds", "30", "--bundles",
                  str(bundles_root), "--codec", "baseline", "--level", "2", "--connect-timeout", "1")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert f"127.0.0.1:{port}" in line and "connection refused" in line, line
    assert "sent" not in r.stdout  # no load was run


def test_bad_images_fail_before_any_load(live_server, bundles_root: Path, tmp_path: Path) -> None:  # noqa: ANN001
    r = _loadtest("--server", live_server.grpc_address, "--bundles", str(bundles_root), "--images",
                  str(tmp_path / "missing.jpg"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert "missing.jpg: no such file" in line, line
