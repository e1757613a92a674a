"""``palettelink loadtest``: N concurrent streams of real coded frames against a server, for a bounded time.

A few frames are coded once (the sample images bus.jpg and zidane.jpg that ship with the package, or
``--images``, through the bundle's codec) and sent round-robin by every stream: the server does its
full work per frame, the load generator almost none. Each stream is one gRPC bidi ``Stream`` with at
most ``--window`` frames unanswered, paced at ``--fps`` per stream (0: as fast as answers come).
After ``--seconds`` the streams stop sending, wait up to ``--drain`` seconds for their answers and
close; the run always ends by itself.

Accounting per frame: *sent*; *answered* (a result without error); *refused* (a result with an error,
counted by status and reason: RESOURCE_EXHAUSTED under admission control is the expected one);
*lost* (sent but never answered, also when a stream broke: the reason is kept); *duplicated* (a
second answer to one frame id); *out of order* (an answer to an id older than one already answered on
its stream). Latency is send → answer of the answered frames (p50/p95/p99). The server's RSS is
sampled every ``--rss-every`` seconds from ``/proc/<pid>/status`` (``--server-pid``, same machine) or
``process_resident_memory_bytes`` of its ``/metrics`` (``--http URL``).

Before any load the server is checked once: reachable within ``--connect-timeout`` (the address and
what answers there named otherwise), willing (the token), holding the bundle with the same tables.

Exit 0 when nothing was lost, duplicated or out of order; 1 otherwise; 2 bad arguments, inputs or
bundle, a server that cannot be reached or refuses (one line, never a traceback).
"""

from __future__ import annotations

import argparse
import json
import queue
import re
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from palettelink.v1 import palettelink_pb2 as pb
from palettelink.v1 import palettelink_pb2_grpc as pb_grpc


@dataclass
class StreamStats:
    sent: int = 0
    answered: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    lost: Counter[str] = field(default_factory=Counter)
    duplicated: int = 0
    out_of_order: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    stream_errors: Counter[str] = field(default_factory=Counter)
    opened: int = 0


def _reason(status: str, message: str) -> str:
    msg = re.sub(r"\d+(\.\d+)?", "N", message)[:80]  # group "3 frames ... 1200 ms" with its kind
    return f"{status}: {msg}" if msg else status


class LoadStream:
    """One stream: a sender loop on the caller's thread, a reader thread per opened call."""

    def __init__(self, channel: grpc.Channel, index: int, bundle: str, frames: list[bytes], window: int,
                 fps: float, metadata: tuple[tuple[str, str], ...], frame_timeout: float) -> None:
        self.stub = pb_grpc.PaletteLinkStub(channel)
        self.index, self.bundle, self.frames = index, bundle, frames
        self.window, self.fps, self.metadata = window, fps, metadata
        self.frame_timeout = frame_timeout
        self.stats = StreamStats()
        self._lock = threading.Condition()
        self._pending: dict[int, float] = {}  # frame id -> send time
        self._answered: set[int] = set()
        self._last = -1
        self._next_id = 0
        self._pause_until = 0.0  # a refusal's retry_after_ms: no new frame on this stream before then

    def run(self, until: float, drain: float) -> StreamStats:
        try:
            while time.monotonic() < until:
                self._one_call(until, drain)
                if time.monotonic() < until:
                    time.sleep(0.5)  # a broken or refused stream: open a new one after a pause
        except Exception as e:  # noqa: BLE001 - a bug here must show in the report, not as a traceback
            with self._lock:
                self.stats.stream_errors[f"load generator: {type(e).__name__}: {e}"[:120]] += 1
                for _ in self._pending:
                    self.stats.lost["the load generator failed"] += 1
                self._pending.clear()
        return self.stats

    def _one_call(self, until: float, drain: float) -> None:
        requests: queue.Queue[pb.StreamRequest | None] = queue.Queue()
        header = pb.StreamHeader(bundle=self.bundle, client_id=f"loadtest-{self.index}")

        def gen():  # noqa: ANN202
            yield pb.StreamRequest(header=header)
            while (r := requests.get()) is not None:
                yield r

        call = self.stub.Stream(gen(), metadata=self.metadata)
        self.stats.opened += 1
        done = threading.Event()
        broke: list[str] = []
        reader = threading.Thread(target=self._read, args=(call, done, broke), daemon=True)
        reader.start()
        interval = 1.0 / self.fps if self.fps > 0 else 0.0
        next_at = time.monotonic()
        while time.monotonic() < until and not done.is_set():
            with self._lock:
                while len(self._pending) >= self.window and not done.is_set() and time.monotonic() < until:
                    self._lock.wait(0.05)
                if done.is_set() or time.monotonic() >= until:
                    break
                fid = self._next_id
                self._next_id += 1
                self._pending[fid] = time.perf_counter()
                self.stats.sent += 1
            pause = self._pause_until - time.monotonic()
            if pause > 0:
                time.sleep(min(pause, max(0.0, until - time.monotonic())))
            payload = self.frames[fid % len(self.frames)]
            requests.put(pb.StreamRequest(frame=pb.Frame(frame_id=fid, payload=payload,
                                                         capture_time_us=int(time.time() * 1e6))))
            if interval:
                next_at += interval
                time.sleep(max(0.0, next_at - time.monotonic()))
        requests.put(None)  # half-close: the server answers what it has, then ends the call
        deadline = time.monotonic() + drain
        with self._lock:
            while self._pending and not done.is_set() and time.monotonic() < deadline:
                self._lock.wait(0.05)
        if not done.wait(max(0.0, deadline - time.monotonic())):
            call.cancel()
            done.wait(5)
        with self._lock:
            why = broke[0] if broke else ("no answer within --drain" if self._pending else "")
            for _ in self._pending:
                self.stats.lost[why] += 1
            self._pending.clear()
            self._last = -1  # ids stay unique over calls; order is per call

    def _read(self, call: Any, done: threading.Event, broke: list[str]) -> None:
        try:
            for resp in call:
                if resp.HasField("result"):
                    self._result(resp.result)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:  # type: ignore[attr-defined]
                reason = _reason(e.code().name, e.details() or "")  # type: ignore[attr-defined]
                self.stats.stream_errors[reason] += 1
                broke.append(f"stream ended: {reason}")
        finally:
            with self._lock:
                done.set()
                self._lock.notify_all()

    def _result(self, r: pb.FrameResult) -> None:
        now = time.perf_counter()
        with self._lock:
            fid = r.frame_id
            if fid in self._answered:
                self.stats.duplicated += 1
                return
            refusal = r.HasField("error") and r.error.status == "RESOURCE_EXHAUSTED"
            if refusal:
                # admission refusals are answered at once, ahead of frames still being worked on (by
                # design); the order that counts is that of the frames the server worked on
                if r.error.retry_after_ms > 0:
                    self._pause_until = time.monotonic() + min(r.error.retry_after_ms, 5000) / 1e3
            else:
                if fid < self._last:
                    self.stats.out_of_order += 1
                self._last = max(self._last, fid)
            sent = self._pending.pop(fid, None)
            if sent is None:
                self.stats.duplicated += 1  # an answer to a frame never sent (or already written off)
                return
            self._answered.add(fid)
            if r.HasField("error"):
                self.stats.refused[_reason(r.error.status, r.error.message)] += 1
            else:
                self.stats.answered += 1
                self.stats.latencies_ms.append((now - sent) * 1e3)
            self._lock.notify_all()


class RssSampler:
    """The server's resident memory every ``every`` seconds, from /proc or from its /metrics."""

    def __init__(self, pid: int | None, http: str | None, every: float = 1.0) -> None:
        self.pid, self.http, self.every = pid, http, every
        self.samples: list[tuple[float, float]] = []  # (seconds since start, MB)
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    @property
    def enabled(self) -> bool:
        return self.pid is not None or bool(self.http)

    def read_mb(self) -> float | None:
        try:
            if self.pid is not None:
                for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
                return None
            if self.http:
                with urllib.request.urlopen(self.http.rstrip("/") + "/metrics", timeout=5) as resp:
                    text = resp.read().decode()
                m = re.search(r"^process_resident_memory_bytes\s+([0-9.e+]+)", text, re.M)
                return float(m.group(1)) / 2**20 if m else None
        except (OSError, ValueError):
            return None
        return None

    def start(self) -> None:
        if self.enabled:
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            mb = self.read_mb()
            if mb is not None:
                self.samples.append((round(time.monotonic() - self._t0, 1), round(mb, 1)))
            self._stop.wait(self.every)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        mb = self.read_mb() if self.enabled else None
        if mb is not None:
            self.samples.append((round(time.monotonic() - self._t0, 1), round(mb, 1)))


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def loadtest(address: str, bundle: str, frames: list[bytes], streams: int, seconds: float, *,
             fps: float = 0.0, window: int = 2, drain: float = 60.0, token: str | None = None,
             server_pid: int | None = None, http: str | None = None,
             rss_every: float = 1.0) -> dict[str, Any]:
    """Run the load and return the report (see :func:`format_report`)."""
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    channels = [grpc.insecure_channel(address, options=options) for _ in range(max(1, min(streams, 8)))]
    rss = RssSampler(server_pid, http, rss_every)
    rss.start()
    t0 = time.monotonic()
    until = t0 + seconds
    workers = [LoadStream(channels[i % len(channels)], i, bundle, frames, window, fps, metadata, drain)
               for i in range(streams)]
    threads = [threading.Thread(target=w.run, args=(until, drain), daemon=True) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + drain + 30)
    wall = time.monotonic() - t0
    rss.stop()
    for c in channels:
        c.close()
    total = StreamStats()
    for w in workers:
        s = w.stats
        total.sent += s.sent
        total.answered += s.answered
        total.refused.update(s.refused)
        total.lost.update(s.lost)
        total.duplicated += s.duplicated
        total.out_of_order += s.out_of_order
        total.latencies_ms += s.latencies_ms
        total.stream_errors.update(s.stream_errors)
        total.opened += s.opened
    lat = total.latencies_ms
    mbs = [mb for _, mb in rss.samples]
    return {
        "server": address, "bundle": bundle, "streams": streams, "seconds": seconds, "fps_per_stream": fps,
        "window": window, "wall_s": round(wall, 1), "frames": len(frames),
        "sent": total.sent, "answered": total.answered, "refused": sum(total.refused.values()),
        "refused_by_reason": dict(total.refused.most_common()), "lost": sum(total.lost.values()),
        "lost_by_reason": dict(total.lost.most_common()), "duplicated": total.duplicated,
        "out_of_order": total.out_of_order, "streams_opened": total.opened,
        "stream_errors": dict(total.stream_errors.most_common()),
        "answered_per_s": round(total.answered / max(seconds, 1e-9), 2),
        "latency_ms": {f"p{q}": None if (v := percentile(lat, q)) is None else round(v, 1)
                       for q in (50, 95, 99)},
        "rss_mb": {"start": mbs[0], "max": max(mbs), "end": mbs[-1],
                   "growth_pct": round(100 * (mbs[-1] - mbs[0]) / mbs[0], 1),
                   "warm": _warm(rss.samples, seconds),
                   "growth_after_warmup_pct": round(100 * (mbs[-1] - _warm(rss.samples, seconds)) /
                                                    _warm(rss.samples, seconds), 1),
                   "samples": rss.samples}
        if mbs else None,
    }


def _warm(samples: list[tuple[float, float]], seconds: float) -> float:
    """The RSS once warmed up: the first sample after 10 % of the run (models and buffers allocated)."""
    return next((mb for t, mb in samples if t >= 0.1 * seconds), samples[-1][1])


def format_report(rep: dict[str, Any]) -> str:
    lat = rep["latency_ms"]

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:,.1f}"

    lines = [f"loadtest {rep['server']} {rep['bundle']}: {rep['streams']} streams x {rep['seconds']:g} s "
             f"(window {rep['window']}, fps/stream {rep['fps_per_stream'] or 'max'}), {rep['wall_s']} s wall",
             f"  {'sent':<14}{rep['sent']:>8}",
             f"  {'answered':<14}{rep['answered']:>8}   ({rep['answered_per_s']} frames/s)",
             f"  {'refused':<14}{rep['refused']:>8}"]
    lines += [f"      {n:>6}  {why}" for why, n in rep["refused_by_reason"].items()]
    lines.append(f"  {'lost':<14}{rep['lost']:>8}")
    lines += [f"      {n:>6}  {why}" for why, n in rep["lost_by_reason"].items()]
    lines += [f"  {'duplicated':<14}{rep['duplicated']:>8}",
              f"  {'out of order':<14}{rep['out_of_order']:>8}",
              f"  latency ms    p50 {fmt(lat['p50'])}  p95 {fmt(lat['p95'])}  p99 {fmt(lat['p99'])}"]
    if rep["stream_errors"]:
        lines.append(f"  stream errors {rep['stream_errors']}")
    if rep["rss_mb"]:
        r = rep["rss_mb"]
        samples = r["samples"]
        step = max(1, len(samples) // 10)
        series = "  ".join(f"{t:g}s {mb:,.0f}" for t, mb in samples[::step])
        lines.append(f"  server RSS MB start {r['start']:,.1f}  max {r['max']:,.1f}  end {r['end']:,.1f}  "
                     f"({r['growth_pct']:+.1f} %; {r['growth_after_warmup_pct']:+.1f} % after the first "
                     f"10 % of the run, from {r['warm']:,.1f})")
        lines.append(f"    over time: {series}")
    return "\n".join(lines)


MAX_IMAGES = 16  # frames coded once from --images (a video gives its first ones)


def precode(bundle: Any, codec: str | None, level: int | None, images: list[Path] | None) -> list[bytes]:
    """The payloads every stream sends: ``images`` (files, folders, videos; the samples when none)
    coded once, :data:`MAX_IMAGES` frames at most. Unreadable inputs, an unknown codec or level:
    :class:`~palettelink.errors.PaletteLinkError` naming them."""
    from palettelink import capture
    from palettelink.codecs import make_encoder
    from palettelink.errors import InvalidRequest

    paths = [str(p) for p in images] if images else [capture.SAMPLES]
    sources = capture.expand(paths)  # every bad path named before anything is coded
    enc = make_encoder(bundle, codec)
    if level is not None and level not in enc.levels():
        raise InvalidRequest(f"--level {level} is not offered by the {enc.codec} codec; its levels are "
                             f"{sorted(enc.levels())}")
    frames = [enc.encode(cap.rgb, level).payload
              for cap in capture.iter_frames(sources, max_frames=MAX_IMAGES)]
    if not frames:
        raise InvalidRequest(f"no frames to send from {' '.join(paths)}")
    return frames


def preflight(address: str, bundle: Any, token: str | None, connect_timeout: float) -> None:
    """One check before the load: the server is reachable, takes the token and holds ``bundle`` with
    the same tables; :class:`~palettelink.errors.PaletteLinkError` saying which and what to do."""
    from edge.transport import ServerUnavailable, wait_ready
    from palettelink.errors import BundleMismatch, BundleNotFound, ServiceUnavailable, Unauthenticated

    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(address) as channel:
        try:
            wait_ready(channel, address, connect_timeout)
            info = pb_grpc.PaletteLinkStub(channel).GetInfo(pb.GetInfoRequest(), metadata=metadata,
                                                            timeout=max(5.0, connect_timeout))
        except ServerUnavailable as e:
            raise ServiceUnavailable(str(e)) from None
        except grpc.RpcError as e:
            code, details = e.code(), e.details()  # type: ignore[attr-defined]
            if code == grpc.StatusCode.UNAUTHENTICATED:
                raise Unauthenticated(f"{address} refused the token: {details} (pass --token)") from None
            raise ServiceUnavailable(f"{address} did not answer GetInfo: {code.name}: {details}") from None
    held = {f"{b.name}/{b.version}": b for b in info.bundles}
    if bundle.id not in held:
        raise BundleNotFound(f"the server at {address} does not hold bundle {bundle.id}; it serves "
                             f"{sorted(held) or 'none'}")
    if held[bundle.id].table_hash and held[bundle.id].table_hash != bundle.table_hash_hex:
        raise BundleMismatch(f"bundle {bundle.id} here and on {address} have different codec tables "
                             "(fetch the server's copy: palettelink-edge --fetch-bundle)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", required=True, metavar="HOST:PORT")
    p.add_argument("--streams", type=int, default=50, help="concurrent streams (default 50)")
    p.add_argument("--seconds", type=float, default=60.0, help="how long the streams send (default 60)")
    p.add_argument("--fps", type=float, default=0.0,
                   help="frames/s per stream (default 0: as fast as answered)")
    p.add_argument("--window", type=int, default=2, help="unanswered frames per stream (default 2)")
    p.add_argument("--drain", type=float, default=60.0,
                   help="seconds to wait for the last answers after sending stops (default 60)")
    p.add_argument("--bundle", default="fall-yolov8", help="bundle name, name/version or folder")
    p.add_argument("--bundles", default=None, help="bundles root (default $PALETTELINK_BUNDLES or ./bundles)")
    p.add_argument("--codec", default=None, help="codec of the frames (default: the bundle's default)")
    p.add_argument("--level", type=int, default=None, help="level (bits or palette level) of the frames")
    p.add_argument("--images", nargs="*", type=Path, default=None,
                   help=f"images, folders or videos to code (first {MAX_IMAGES} frames; default: the sample "
                        "images that ship with the package)")
    p.add_argument("--token", default=None, help="bearer token")
    p.add_argument("--connect-timeout", type=float, default=3.0, metavar="S",
                   help="seconds to wait for the server before any load (default 3)")
    p.add_argument("--server-pid", type=int, default=None, help="sample the server's RSS from /proc/PID")
    p.add_argument("--http", default=None, metavar="URL", help="sample the server's RSS from URL/metrics")
    p.add_argument("--rss-every", type=float, default=1.0, help="RSS sampling period in seconds (default 1)")
    p.add_argument("--json", type=Path, default=None, help="write the report as JSON here")


def run(args: argparse.Namespace) -> int:
    from palettelink.bundle import default_root, find_bundle
    from palettelink.errors import BundleNotFound, InvalidRequest
    from palettelink.fetch import default_cache

    if args.streams < 1 or args.seconds <= 0 or args.window < 1 or args.drain <= 0 or args.fps < 0 \
            or args.connect_timeout <= 0:
        raise InvalidRequest("--streams and --window must be ≥ 1, --seconds, --drain and --connect-timeout "
                             "> 0, --fps ≥ 0")
    try:
        bundle = find_bundle(args.bundle, args.bundles or default_root(), side="edge")
    except BundleNotFound as first:
        try:
            bundle = find_bundle(args.bundle, default_cache(), side="edge")
        except BundleNotFound:
            raise BundleNotFound(f"{first} (nor in the fetch cache {default_cache()})") from None
    frames = precode(bundle, args.codec, args.level, args.images)
    preflight(args.server, bundle, args.token, args.connect_timeout)
    print(f"loadtest: {len(frames)} frames coded once ({', '.join(f'{len(f):,} B' for f in frames)}); "
          f"{args.streams} streams for {args.seconds:g} s", flush=True)
    rep = loadtest(args.server, bundle.id, frames, args.streams, args.seconds, fps=args.fps,
                   window=args.window, drain=args.drain, token=args.token, server_pid=args.server_pid,
                   http=args.http, rss_every=args.rss_every)
    print(format_report(rep))
    if args.json:
        args.json.write_text(json.dumps(rep, indent=2) + "\n")
    return 1 if rep["lost"] or rep["duplicated"] or rep["out_of_order"] else 0
