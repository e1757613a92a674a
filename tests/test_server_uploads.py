"""Uploads under attack, on a real ``palettelink-server`` process: 16 concurrent decompression bombs
(a ~100 KB PNG that decodes to 8192² = 67 M pixels, 200 MB of BGR each) sent to ``/api/try`` keep the
server's peak RSS (``VmHWM``, start-up included) under 2.5 GB. With the default pixel budget every bomb
is refused from its header (413) before any decode; with a budget that lets 8192² through, the upload
cap (``--max-try-uploads 2``) decodes two at a time and refuses the rest at once (429, Retry-After).
Before this, the 16 were all decoded and coded before admission control: 1.5 → 6.9 GB."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from helpers import blank_png

REPO = Path(__file__).resolve().parents[1]
LIMIT = 2.5 * (1 << 30)
BOMBS = 16


def peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def serve(bundles_root: Path, *flags: str):  # noqa: ANN201 - (process, http URL)
    proc = subprocess.Popen([sys.executable, "-m", "server.main", "--bundles", str(bundles_root),
                             "--bundle", "fall-yolov8", "--grpc-port", "0", "--http-port", "0", "--no-verify",
                             "--log-level", "warning", *flags],
                            cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    log = []
    for line in proc.stdout:
        log.append(line)
        if line.startswith("READY "):
            http = dict(f.split("=", 1) for f in line.split()[1:] if "=" in f)["http"]
            threading.Thread(target=log.extend, args=(proc.stdout,), daemon=True).start()  # drain
            return proc, f"http://{http}", log
    proc.wait(10)
    pytest.fail("server did not get READY:\n" + "".join(log))


@pytest.mark.parametrize("budget", ["default", "8192²"])
def test_sixteen_concurrent_bombs_keep_the_server_under_2_5_gb(bundles_root: Path, budget: str) -> None:
    data = blank_png(8192, 8192)  # ~100 KB that decodes to 8192² × 3 bytes
    assert len(data) < 200_000
    flags = [] if budget == "default" else ["--try-max-pixels", str(8192 * 8192)]
    proc, url, log = serve(bundles_root, *flags)
    try:
        before = peak_rss(proc.pid)
        go = threading.Barrier(BOMBS)

        def send(_: int) -> httpx.Response:
            with httpx.Client(base_url=url, timeout=300) as c:
                go.wait(30)
                return c.post("/api/try", params={"codec": "baseline", "level": 4}, content=data)

        with concurrent.futures.ThreadPoolExecutor(BOMBS) as pool:
            answers = list(pool.map(send, range(BOMBS)))
        statuses = sorted(r.status_code for r in answers)
        peak = peak_rss(proc.pid)
        print(f"\n[{budget} budget] peak RSS {before / 2**30:.2f} GB after start-up, {peak / 2**30:.2f} GB "
              f"after {BOMBS} concurrent bombs; answers {statuses}")
        for r in answers:
            err = r.json().get("error") if r.status_code != 200 else None
            if r.status_code == 413:
                assert err["status"] == "RESOURCE_EXHAUSTED" and "8192x8192" in err["message"]
                assert "--try-max-pixels" in err["message"]
            elif r.status_code == 429:
                assert "--max-try-uploads" in err["message"] and int(r.headers["retry-after"]) >= 1
            else:
                assert r.status_code == 200, r.text
        if budget == "default":  # refused from its header (none decoded), or at once for the cap
            assert set(statuses) <= {413, 429} and 413 in statuses, statuses
        else:
            assert 1 <= statuses.count(200) <= 2 * 2 and statuses.count(429) >= BOMBS - 4, statuses
        assert peak < LIMIT, f"peak RSS {peak / 2**30:.2f} GB"
        assert httpx.get(url + "/healthz", timeout=30).status_code == 200
    finally:
        proc.terminate()
        proc.wait(60)
