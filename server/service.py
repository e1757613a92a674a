"""The one data plane: decode → task → results, with timings and metrics.

Both transports (``grpc_service``, ``http_app``) are a few lines over :class:`Service`; all the real
work and every check lives here, so the two behave the same and are tested once. Every failure is a
:class:`~palettelink.errors.PaletteLinkError` (or a bug); transports map them in ``server/errors.py``.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from palettelink import bitstream, codecs
from palettelink.bundle import Bundle, find_bundle, list_bundles
from palettelink.errors import (
    BundleNotFound,
    InvalidRequest,
    InvalidStream,
    PaletteLinkError,
    ResourceExhausted,
    ServiceUnavailable,
    TooLarge,
)
from palettelink.levels import codec_levels
from server import __version__
from server.batching import Batcher
from server.errors import clip
from server.metrics import Metrics, device_kind
from server.results import FrameResult, TaskOutput, Timings
from server.tasks import MODULES, make_runner, tasks_for

log = logging.getLogger("palettelink.server")

MAX_NAME = 128  # characters of a client-supplied name (bundle, task, client id)


def check_name(value: str, what: str, limit: int = MAX_NAME) -> str:
    """``value`` if it is at most ``limit`` characters; else :class:`InvalidRequest` quoting only its
    start, so that neither the stored frame list nor the error grows with what a client sent."""
    if len(value) > limit:
        raise InvalidRequest(f"{what} of {len(value)} characters is longer than {limit}: "
                             f"{clip(value, 40)!r}")
    return value


@dataclass(frozen=True)
class EdgeReport:
    """What a client says about a frame: its timings (echoed into metrics) and the codec's novelty
    and fallback for it (echoed into the result, the dashboard and metrics)."""

    front_ms: float = 0.0
    encode_ms: float = 0.0
    capture_time_us: int = 0
    novelty: float = 0.0  # 0 = not measured
    fallback: str = ""


@dataclass(frozen=True)
class LevelInfo:
    level: int
    palette_size: int = 0
    mean_bits: float = 0.0
    mean_bpp: float = 0.0


@dataclass(frozen=True)
class CodecInfo:
    name: str
    levels: list[LevelInfo]
    progressive: bool = False


@dataclass(frozen=True)
class TensorInfo:
    name: str
    layer: int
    shape: list[int]


@dataclass(frozen=True)
class BundleInfo:
    name: str
    version: str
    table_hash: str
    tasks: list[str]
    class_names: list[str]
    codecs: list[CodecInfo]
    tensors: list[TensorInfo]
    input_size: int


def codec_info(bundle: Bundle, name: str) -> CodecInfo:
    """A codec's levels as the core reads them from the manifest (``palettelink.levels.codec_levels``)."""
    entry = bundle.codecs.get(name, {})
    levels = [LevelInfo(int(lv["level"]), int(lv.get("palette_size") or 0), float(lv.get("mean_bits") or 0),
                        float(lv.get("mean_bpp") or 0)) for lv in codec_levels(bundle, name)]
    return CodecInfo(name, levels, bool(entry.get("progressive", False)))


@dataclass
class LoadedBundle:
    bundle: Bundle
    decoder: codecs.Decoder
    batchers: dict[str, Batcher]

    @property
    def tasks(self) -> list[str]:
        return list(self.batchers)

    def info(self) -> BundleInfo:
        b = self.bundle
        return BundleInfo(
            name=b.name, version=b.version, table_hash=b.table_hash_hex, tasks=self.tasks,
            class_names=list(b.class_names),
            codecs=[codec_info(b, c) for c in codecs.available(b)],
            tensors=[TensorInfo(t.name, t.layer, list(t.shape)) for t in b.tensors],
            input_size=b.input_size,
        )


def _version_key(version: str) -> tuple[int, int | str]:
    return (0, int(version)) if version.isdigit() else (1, version)


class StreamSlots:
    """Stream slots: at most ``total`` streams in all and ``per_client`` per client key (the token's
    client name, else the client id of the header, else the peer address), counted from the moment a
    call arrives, before its header, so neither idle nor header-less streams can take the gRPC worker
    pool (sized above ``total``) from health checks, unary calls or other clients. Thread-safe."""

    def __init__(self, total: int, per_client: int, retry_after_ms: int = 1000) -> None:
        self.total = max(1, total)
        self.per_client = max(1, min(per_client, self.total))
        self.retry_after_ms = retry_after_ms
        self._lock = threading.Lock()
        self._by_key: dict[str, int] = {}
        self._n = 0

    @property
    def in_use(self) -> int:
        return self._n

    def count(self, key: str) -> int:
        with self._lock:
            return self._by_key.get(key, 0)

    def acquire(self, key: str) -> str:
        """Take a slot for ``key`` (returned), or :class:`ResourceExhausted` naming the limit."""
        with self._lock:
            self._check(key)
            self._by_key[key] = self._by_key.get(key, 0) + 1
            self._n += 1
        return key

    def _check(self, key: str) -> None:
        if self._n >= self.total:
            raise ResourceExhausted(f"this server already holds its limit of {self.total} streams "
                                    "(--max-streams); retry later or use another replica",
                                    self.retry_after_ms)
        if self._by_key.get(key, 0) >= self.per_client:
            raise ResourceExhausted(f"client {clip(key, 80)!r} already holds its limit of {self.per_client} "
                                    "streams (--max-streams-per-client); close one or retry later",
                                    self.retry_after_ms)

    def move(self, old: str, new: str) -> str:
        """Re-key a held slot (the header named the client); refused like :meth:`acquire`, keeping
        the old slot (release it)."""
        if old == new:
            return old
        with self._lock:
            n = self._by_key.get(new, 0)
            if n >= self.per_client:
                self._n -= 1  # check as if the slot were free, then take it back
                try:
                    self._check(new)
                finally:
                    self._n += 1
            self._drop(old)
            self._by_key[new] = n + 1
        return new

    def release(self, key: str) -> None:
        with self._lock:
            self._drop(key)
            self._n -= 1

    def _drop(self, key: str) -> None:
        n = self._by_key.get(key, 0) - 1
        if n > 0:
            self._by_key[key] = n
        else:
            self._by_key.pop(key, None)


ACTIVE_S = 2.0  # a client that sent a frame this recently counts for the fair share


@dataclass
class _ClientShare:
    pending: int = 0  # frames of this client admitted and not answered yet
    seen: float = 0.0  # monotonic time of its last frame


class Admission:
    """Admission control: at most ``max_pending`` frames admitted in all (waiting for or in decode and
    task). A frame over the bound is refused at once (RESOURCE_EXHAUSTED with a retry hint) instead of
    queueing: latency stays bounded by roughly ``max_pending`` frame times however many clients push.
    Within one stream at most ``max_per_stream`` frames wait; the transport stops reading that stream
    meanwhile, so HTTP/2 flow control holds its sender (nothing is refused for that).

    Fair share: once half the bound is taken, a client (the token's client, else the stream header's
    client id, else the peer) holds at most ``ceil(max_pending / clients)`` admitted frames, where
    ``clients`` are those that sent a frame in the last :data:`ACTIVE_S` seconds. A client that pushes
    without pause (or ignores retry hints) then takes its share, never the others': their frames still
    find room. A lone client keeps the whole bound. Thread-safe."""

    def __init__(self, metrics: Metrics, max_pending: int = 32, max_per_stream: int = 4,
                 shed_latency_ms: float = 2000.0, floor: int = 8, fair_share: bool = True) -> None:
        self.metrics = metrics
        self.max_pending = max(1, max_pending)
        self.max_per_stream = max(1, max_per_stream)
        # Latency feedback: while recent frames took longer than shed_latency_ms, only ``floor``
        # frames (a full batch) are admitted at a time, whatever max_pending allows.
        self.shed_latency_ms = shed_latency_ms
        self.floor = max(1, min(floor, self.max_pending))
        self.fair_share = fair_share
        self._lock = threading.Lock()
        self._pending = 0
        self._frame_ms = 100.0  # moving average of admitted frames' server time, for the retry hint
        self._clients: dict[str, _ClientShare] = {}

    @property
    def pending(self) -> int:
        return self._pending

    def retry_after_ms(self) -> int:
        """About the time the frames admitted now need to clear (at least 50 ms, at most 10 s)."""
        return int(min(10_000, max(50, self._frame_ms * max(1, self._pending) / 4)))

    def _active(self, now: float) -> int:
        """Clients sending lately (or with frames admitted); the long gone are forgotten."""
        if len(self._clients) > 64:
            for key in [k for k, c in self._clients.items() if not c.pending and now - c.seen > ACTIVE_S]:
                del self._clients[key]
        return max(1, sum(1 for c in self._clients.values() if c.pending or now - c.seen <= ACTIVE_S))

    def admit(self, client: str = "") -> None:
        """Count one frame of ``client`` in, or refuse it (:class:`ResourceExhausted` with
        ``retry_after_ms``); ``""``: a caller with no name (no fair share)."""
        with self._lock:
            now = time.monotonic()
            n = self._pending
            slow = self.shed_latency_ms > 0 and self._frame_ms > self.shed_latency_ms
            c = None
            if client:
                c = self._clients.get(client)
                if c is None:
                    c = self._clients[client] = _ClientShare()
                c.seen = now
            active = self._active(now) if c is not None and self.fair_share else 1
            share = -(-self.max_pending // active)
            over_share = c is not None and c.pending >= share and n >= self.max_pending // 2
            if n < (self.floor if slow else self.max_pending) and not over_share:
                self._pending += 1
                if c is not None:
                    c.pending += 1
                self.metrics.pending.set(self._pending)
                return
            held = c.pending if c is not None else 0
        ms = self.retry_after_ms()
        if n >= self.max_pending:
            reason = "server_queue"
            why = f"{n} frames already waiting (limit {self.max_pending}, --max-pending-frames)"
        elif slow and n >= self.floor:
            reason = "latency"
            why = (f"recent frames took {self._frame_ms:.0f} ms, over --shed-latency-ms "
                   f"{self.shed_latency_ms:g}, and {n} are already waiting")
        else:
            reason = "client_share"
            why = (f"client {clip(client, 80)!r} already has {held} of the {n} frames waiting: its fair "
                   f"share of --max-pending-frames {self.max_pending} while {active} clients send")
        self.metrics.refused.labels(reason).inc()
        raise ResourceExhausted(f"server overloaded, frame refused: {why}; retry after {ms} ms", ms)

    def done(self, seconds: float | None = None, client: str = "") -> None:
        with self._lock:
            self._pending -= 1
            self.metrics.pending.set(self._pending)
            c = self._clients.get(client) if client else None
            if c is not None and c.pending > 0:
                c.pending -= 1
            if seconds is not None:
                self._frame_ms = 0.8 * self._frame_ms + 0.2 * seconds * 1e3

    @contextmanager
    def frame(self, client: str = "") -> Iterator[None]:
        self.admit(client)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.done(time.perf_counter() - t0, client)


HISTORY = 60  # frames of each stream kept for the dashboard's rates and sparklines
MAX_LAST_BOXES = 100
# What of a frame's masks and landmarks the dashboard's JSON carries (the SSE event repeats it every
# second for every open stream, so it stays bounded whatever a task returns).
MAX_LAST_MASKS = 4
MAX_MASK_RUNS = 20_000  # runs of one mask (a person at 1080p: a few thousand); noisier ones are left out
MAX_LAST_LANDMARKS = 16  # landmark sets: faces (468 points each) or people (17 keypoints each)
PREVIEW_FRAMES = 32  # the preview store's default bounds: pictures …
PREVIEW_BYTES = 16 << 20  # … and bytes (a 1080p JPEG at quality 85 is ~0.2-0.4 MB)
PREVIEW_PATH = "/api/frames/{key}/preview.jpg"  # where the HTTP app serves a stored preview
_stream_ids = itertools.count(1)


class PreviewGone(PaletteLinkError):
    """No stored preview for that frame: none was asked for, or the store's bound evicted it."""

    code = "NOT_FOUND"


class PreviewStore:
    """The rebuilt pictures (JPEG) of recent frames whose sender asked for one, for the dashboard.

    Frames are named by the key of the recent-frames list. Bounded twice, oldest out first: at most
    ``max_items`` pictures and ``max_bytes`` bytes (a picture larger than that is not kept). The
    newest picture of each open stream (its ``owner``) goes last, so the live view can still fetch the
    frame an event just named while other streams push faster than it polls. Thread-safe."""

    def __init__(self, max_items: int = PREVIEW_FRAMES, max_bytes: int = PREVIEW_BYTES) -> None:
        self.max_items = max(0, int(max_items))
        self.max_bytes = max(0, int(max_bytes))
        self._lock = threading.Lock()
        self._items: OrderedDict[int, bytes] = OrderedDict()
        self._newest: dict[Hashable, int] = {}  # owner (a stream) → key of its newest picture
        self._bytes = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    @property
    def n_bytes(self) -> int:
        return self._bytes

    def put(self, key: int, jpeg: bytes, owner: Hashable | None = None) -> bool:
        """Keep ``jpeg`` as frame ``key``'s picture, evicting the oldest over the bounds; True if kept."""
        if not jpeg or len(jpeg) > self.max_bytes or self.max_items == 0:
            return False
        with self._lock:
            old = self._items.pop(key, None)
            self._bytes += len(jpeg) - (len(old) if old is not None else 0)
            self._items[key] = bytes(jpeg)
            if owner is not None:
                self._newest[owner] = key
            self._evict()
            return key in self._items

    def _evict(self) -> None:
        def over() -> bool:
            return len(self._items) > self.max_items or self._bytes > self.max_bytes

        newest = set(self._newest.values())
        for spare_newest in (True, False):  # a stream's newest only when the rest cannot make room
            for k in list(self._items):
                if not over():
                    return
                if spare_newest and k in newest:
                    continue
                self._bytes -= len(self._items.pop(k))
                self.evicted += 1

    def get(self, key: int) -> bytes | None:
        with self._lock:
            return self._items.get(key)

    def release(self, owner: Hashable) -> None:
        """``owner`` (a stream) closed: its newest picture ages like any other from now on."""
        with self._lock:
            self._newest.pop(owner, None)


def output_json(out: TaskOutput) -> dict[str, Any]:
    """A task output as the dashboard's JSON: boxes, masks (run-length counts as on the wire) and
    landmark sets, each bounded (``MAX_LAST_*``); the preview goes to the :class:`PreviewStore`."""
    masks = [{"width": mk.width, "height": mk.height, "counts": list(mk.counts), "class_id": mk.class_id,
              "score": mk.score} for mk in out.masks[:MAX_LAST_MASKS] if len(mk.counts) <= MAX_MASK_RUNS]
    landmarks = [{"scheme": ls.scheme, "score": ls.score,
                  "points": [[round(float(x), 1), round(float(y), 1), round(float(v), 3)]
                             for x, y, v in ls.points]} for ls in out.landmarks[:MAX_LAST_LANDMARKS]]
    return {"boxes": [asdict(b) for b in out.boxes[:MAX_LAST_BOXES]], "masks": masks, "landmarks": landmarks}


@dataclass
class StreamSession:
    """One open Stream: bundle and task fixed by its header; frames go through :meth:`analyze`."""

    service: Service
    bundle: str
    task: str
    client: str
    want_preview: bool = False
    opened: float = field(default_factory=time.time)
    frames: int = 0
    n_bytes: int = 0
    errors: int = 0

    queued: int = 0  # frames received and admitted, not answered yet (set by the transport)
    refused: int = 0
    sid: int = field(default_factory=lambda: next(_stream_ids))  # the dashboard's name for it
    key: str = ""  # whose stream limits and fair share of admission it counts in (see open_stream)
    # The dashboard's rolling window: (time, bytes, codec, level, server ms) of the last frames, and
    # the newest frame's boxes. Bounded: HISTORY frames, MAX_LAST_BOXES boxes.
    history: deque[tuple[float, int, str, int, float]] = field(default_factory=lambda: deque(maxlen=HISTORY))
    last: dict[str, Any] | None = None

    def analyze(self, frame_id: int, payload: bytes, edge: EdgeReport | None = None,
                admitted: bool = False) -> FrameResult:
        """One frame of this stream; ``admitted``: the transport already counted it in
        (:meth:`Admission.admit`), else it is admitted here."""
        self.frames += 1
        self.n_bytes += len(payload)
        try:
            key, r = self.service.analyze_keyed(self.bundle, self.task, payload, self.want_preview,
                                                frame_id=frame_id, client=self.client, edge=edge,
                                                admit=not admitted, preview_owner=self.sid,
                                                admission_key=self.key)
        except Exception:
            self.errors += 1
            raise
        now = time.time()
        self.history.append((now, r.payload_bytes, r.codec, r.level, r.timings.total_ms))
        self.last = {"time": now, "key": key, "frame_id": frame_id, "task": r.task, "codec": r.codec,
                     "level": r.level, "bytes": r.payload_bytes, "bpp": r.bpp, "width": r.image_width,
                     "height": r.image_height, **output_json(r.output)}
        return r

    def stats(self, window_s: float = 10.0) -> dict[str, Any]:
        """What the dashboard shows of this stream: totals, rates over the last ``window_s`` seconds,
        server-latency percentiles and the per-frame series of the rolling window."""
        hist = list(self.history)
        recent = [h for h in hist if h[0] >= time.time() - window_s]
        span = recent[-1][0] - recent[0][0] if len(recent) > 1 else 0.0
        lat = sorted(h[4] for h in hist)

        def pct(q: float) -> float | None:
            return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else None

        return {"id": self.sid, "client": self.client, "bundle": self.bundle, "task": self.task,
                "opened": self.opened, "frames": self.frames, "bytes": self.n_bytes, "errors": self.errors,
                "queued": self.queued, "refused": self.refused,
                "codec": hist[-1][2] if hist else None, "level": hist[-1][3] if hist else None,
                "kbps": sum(h[1] for h in recent[1:]) * 8 / 1e3 / span if span > 0 else None,
                "fps": (len(recent) - 1) / span if span > 0 else None,
                "latency_p50_ms": pct(0.5), "latency_p95_ms": pct(0.95),
                "series": {"kbit": [h[1] * 8 / 1e3 for h in hist], "level": [h[3] for h in hist]},
                "last": self.service.with_preview(self.last)}


class Service:
    """Loads bundles and answers frames. Thread-safe: transports call it from many threads.

    ``device`` is the torch device of the task models; ``threads`` caps torch's intra-op threads
    (default: the CPUs this process may run on, which in a container can be far fewer than the
    host's cores torch would otherwise use). Frames that wait while the model runs are batched, up
    to ``max_batch``; a lone frame waits at most ``batch_wait_ms`` for company. Batching pays on a
    CPU too: on 2 cores a batch of 4 through the YOLOv8 tail cost ~3× one frame, not 4×.
    """

    def __init__(self, bundles_root: str | os.PathLike[str], bundles: Sequence[str] | None = None, *,
                 device: str = "cpu", threads: int | None = None, max_batch: int = 8,
                 batch_wait_ms: float = 2.0, max_queue: int = 64, max_streams: int = 64,
                 max_streams_per_client: int = 16, max_pending: int = 32, max_stream_queue: int = 4,
                 shed_latency_ms: float = 2000.0,
                 stream_idle_timeout: float = 60.0, header_timeout: float = 5.0,
                 max_pixels: int = 1 << 26, recent_frames: int = 200, warmup: bool = True,
                 verify: bool = True, preview_frames: int = PREVIEW_FRAMES,
                 preview_bytes: int = PREVIEW_BYTES) -> None:
        self.root = Path(bundles_root)
        self.names = list(bundles) if bundles else None
        self.device = device
        self.threads = threads
        self.max_batch = max_batch
        self.batch_wait_ms = batch_wait_ms
        self.max_queue = max_queue
        self.max_streams = max_streams
        self.stream_idle_timeout = stream_idle_timeout
        self.header_timeout = header_timeout
        self.max_pixels = max_pixels
        self.warmup = warmup
        self.verify = verify
        self.metrics = Metrics()
        self.metrics.ready.set_function(lambda: float(self.ready and not self.draining))
        self.bundles: dict[str, LoadedBundle] = {}
        self.load_errors: dict[str, str] = {}
        self.frame_costs: dict[tuple[str, str], float] = {}  # (bundle, task) → seconds, at start-up
        self._found: list[Bundle] | None = None  # what discover() read and verified
        self.started = time.time()
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._recent: deque[dict[str, Any]] = deque(maxlen=recent_frames)
        self._frame_keys = itertools.count(1)  # names each frame of the recent list (and its preview)
        # The pictures of recent frames whose sender asked for one (want_preview, or task preview).
        self.previews = PreviewStore(preview_frames, preview_bytes)
        self._streams: dict[int, StreamSession] = {}
        self._closed: deque[dict[str, Any]] = deque(maxlen=8)  # the dashboard's recently closed streams
        self.slots = StreamSlots(max_streams, max_streams_per_client)
        self.admission = Admission(self.metrics, max_pending, max_stream_queue, shed_latency_ms,
                                   floor=max(2, max_batch))
        # A stream refused again and again is left unread a while (grpc_service._Inbox._hold).
        self.throttle_streams = True
        self._draining = threading.Event()

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def discover(self, log_errors: bool = True) -> list[Bundle]:
        """Read and verify every bundle (or the named ones): manifest and every file's sha256, nothing
        built yet, so a broken bundle is known at once (``palettelink-server`` reports these before it
        listens). Broken ones are skipped and listed in ``load_errors`` (logged unless ``log_errors``
        is false: the caller reports them); none usable at all is :class:`BundleNotFound`. Once."""
        if self._found is None:
            if self.names is not None:
                sources: list[tuple[str, Any]] = [(n, lambda n=n: find_bundle(n, self.root, self.verify))
                                                  for n in self.names]
            else:
                sources = [(str(p), lambda p=p: Bundle.load(p, self.verify)) for p in list_bundles(self.root)]
            found = []
            for label, load in sources:
                try:
                    found.append(load())
                except PaletteLinkError as e:
                    if log_errors:
                        log.error("bundle %s not loaded: %s", label, e)
                    self.load_errors[label] = str(e)
            self._found = found
        if not self._found:
            raise self._none_usable()
        return self._found

    def _none_usable(self) -> BundleNotFound:
        why = "; ".join(f"{k}: {v}" for k, v in self.load_errors.items())
        return BundleNotFound(f"no usable bundle under {self.root.resolve()}"
                              + (f": {why}" if why else "; build one with `palettelink build-bundle`"))

    def load(self) -> None:
        """Load and verify every bundle (or the named ones: :meth:`discover`, if not done yet), build
        their task runners, warm them up.

        A broken bundle folder is logged and skipped (listed in ``load_errors``) so one bad copy does
        not keep the others offline; no usable bundle at all is an error.
        """
        for bundle in self.discover():
            try:
                self._add(bundle)
            except PaletteLinkError as e:
                log.error("bundle %s not loaded: %s", bundle.path, e)
                self.load_errors[str(bundle.path)] = str(e)
        if not self.bundles:
            raise self._none_usable()
        self.metrics.bundles_loaded.set(len(self.bundles))
        self.metrics.set_bundles(list(self.bundles))
        self.metrics.init_series({
            bid: {"codecs": {c.name: [lv.level for lv in c.levels] for c in info.codecs}, "tasks": info.tasks}
            for bid, info in zip(self.bundles, self.info(), strict=True)})
        self._ready.set()
        log.info("serving bundles %s", ", ".join(f"{k} {v.tasks}" for k, v in self.bundles.items()))

    def _add(self, bundle: Bundle) -> None:
        if bundle.id in self.bundles:
            return
        batchers = {}
        for task in tasks_for(bundle):
            runner = make_runner(task, bundle, self.device)
            self._set_torch_threads()
            if self.warmup:
                runner.warmup()
                t0 = time.perf_counter()  # a second, warm run: the per-frame cost on this device
                runner.warmup()
                cost = self.frame_costs[(bundle.id, task)] = time.perf_counter() - t0
                kind = device_kind(self.device)
                self.metrics.frame_cost.labels(bundle.id, task, self.device, kind).set(cost)
            batchers[task] = Batcher(
                runner, name=f"{bundle.id}:{task}", max_batch=self.max_batch, max_wait_ms=self.batch_wait_ms,
                max_queue=self.max_queue,
                on_batch=self.metrics.batch.labels(bundle.id, task).observe,
            )
        if not batchers:
            raise InvalidRequest(f"bundle {bundle.id} has task {bundle.task!r}; "
                                 f"this server runs {sorted(MODULES)}")
        self.bundles[bundle.id] = LoadedBundle(bundle, codecs.Decoder(bundle), batchers)
        log.info("loaded bundle %s from %s", bundle.id, bundle.path)

    def _set_torch_threads(self) -> None:
        if "torch" not in sys.modules or not self.device.startswith("cpu"):
            return
        import torch

        n = self.threads
        if not n:
            n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        if torch.get_num_threads() != n:
            torch.set_num_threads(max(1, int(n or 1)))

    @property
    def draining(self) -> bool:
        """True from :meth:`drain` on: readiness is false, running calls are being finished."""
        return self._draining.is_set()

    def drain(self) -> None:
        """Start shutting down: ``/readyz`` answers 503 from now on (the first step of a SIGTERM)."""
        self._draining.set()

    def close(self) -> None:
        self._draining.set()
        self._ready.clear()
        for lb in self.bundles.values():
            for b in lb.batchers.values():
                b.close()

    # -- data plane ------------------------------------------------------------------------------

    def resolve(self, name: str) -> LoadedBundle:
        """``""`` (the only bundle), ``name`` (its highest loaded version) or ``name/version``."""
        if not self.ready:
            raise ServiceUnavailable("bundles are still loading")
        if not name:
            if len(self.bundles) == 1:
                return next(iter(self.bundles.values()))
            raise InvalidRequest(f"several bundles are loaded ({sorted(self.bundles)}): name one")
        if name in self.bundles:
            return self.bundles[name]
        versions = [lb for lb in self.bundles.values() if lb.bundle.name == name]
        if not versions:
            raise BundleNotFound(f"no bundle {name!r} on this server; it serves {sorted(self.bundles)}")
        return max(versions, key=lambda lb: _version_key(lb.bundle.version))

    def _batcher(self, lb: LoadedBundle, task: str) -> tuple[str, Batcher]:
        task = task or lb.bundle.task
        if task not in lb.batchers:
            raise InvalidRequest(f"bundle {lb.bundle.id} serves tasks {lb.tasks}, not {task!r}")
        return task, lb.batchers[task]

    def analyze(self, bundle: str, task: str, payload: bytes, want_preview: bool = False, *,
                frame_id: int = 0, client: str = "", edge: EdgeReport | None = None,
                admit: bool = True, admission_key: str | None = None) -> FrameResult:
        """Decode one coded frame and run ``task`` on it (``""`` = the bundle's own task). With
        ``admit`` the frame first passes admission control (refused at once when the server is full);
        without, the caller admitted it and :meth:`Admission.done` is called here either way.
        ``admission_key``: whose fair share the frame counts in (default ``client``)."""
        return self.analyze_keyed(bundle, task, payload, want_preview, frame_id=frame_id, client=client,
                                  edge=edge, admit=admit, admission_key=admission_key)[1]

    def analyze_keyed(self, bundle: str, task: str, payload: bytes, want_preview: bool = False, *,
                      frame_id: int = 0, client: str = "", edge: EdgeReport | None = None,
                      admit: bool = True, preview_owner: Hashable | None = None,
                      admission_key: str | None = None) -> tuple[int, FrameResult]:
        """:meth:`analyze`, also returning the frame's key in the recent-frames list (which names its
        stored preview, if any). ``preview_owner``: the stream whose newest picture this is."""
        who = client if admission_key is None else admission_key
        if admit:
            self.admission.admit(who)
        t0 = time.perf_counter()
        try:
            return self._analyze(bundle, task, payload, want_preview, frame_id, client, edge, t0,
                                 preview_owner)
        finally:
            self.admission.done(time.perf_counter() - t0, who)

    def _analyze(self, bundle: str, task: str, payload: bytes, want_preview: bool, frame_id: int,
                 client: str, edge: EdgeReport | None, t0: float,
                 preview_owner: Hashable | None = None) -> tuple[int, FrameResult]:
        key = next(self._frame_keys)
        summary: dict[str, Any] = {"key": key, "time": time.time(), "client": clip(client, 2 * MAX_NAME + 1),
                                   "frame_id": frame_id, "bundle": clip(bundle, MAX_NAME),
                                   "task": clip(task, MAX_NAME), "bytes": len(payload)}
        try:
            check_name(bundle, "bundle name")
            check_name(task, "task name")
            lb = self.resolve(bundle)
            task, batcher = self._batcher(lb, task)
            summary.update(bundle=lb.bundle.id, task=task)
            if not payload:
                raise InvalidStream("empty payload")
            payload = bytes(payload)
            # The declared image size is checked from the header, before any decoding work.
            w, h = bitstream.unpack(payload, allow_truncated_layers=True).image_size
            if w * h > self.max_pixels:
                raise TooLarge(f"image {w}x{h} ({w * h} pixels) exceeds this server's limit of "
                               f"{self.max_pixels} pixels")
            decoded = lb.decoder.decode(payload)
            t1 = time.perf_counter()
            bid, level = lb.bundle.id, str(decoded.level)
            self.metrics.frames.labels(bid, decoded.codec, level).inc()
            self.metrics.bytes.labels(bid, decoded.codec, level).inc(decoded.n_bytes)
            self.metrics.decode.labels(bid, decoded.codec).observe(t1 - t0)
            br = batcher.submit(decoded, want_preview)
            total_ms = (time.perf_counter() - t0) * 1e3
        except Exception as e:
            summary["error"] = {"status": e.code if isinstance(e, PaletteLinkError) else "INTERNAL",
                                "message": str(e)[:300]}
            self._remember(summary)
            raise
        bpp = 8.0 * decoded.n_bytes / (w * h)
        result = FrameResult(
            frame_id=frame_id, bundle=bid, task=task, codec=decoded.codec, level=decoded.level,
            payload_bytes=decoded.n_bytes, bpp=bpp, truncated=decoded.truncated, image_width=w,
            image_height=h, output=br.output, batch_size=br.batch_size,
            novelty=edge.novelty if edge is not None else 0.0,
            fallback=clip(edge.fallback, 300) if edge is not None else "",
            timings=Timings(decode_ms=(t1 - t0) * 1e3, task_ms=br.task_ms, queue_ms=br.queue_ms,
                            total_ms=total_ms),
        )
        m = self.metrics
        m.bpp.labels(bid, decoded.codec).observe(bpp)
        m.task.labels(bid, task).observe(br.task_ms / 1e3)
        m.queue.labels(bid, task).observe(br.queue_ms / 1e3)
        m.total.labels(bid, task).observe(total_ms / 1e3)
        if edge is not None:
            if edge.front_ms > 0:
                m.edge_front.labels(bid).observe(edge.front_ms / 1e3)
            if edge.encode_ms > 0:
                m.edge_encode.labels(bid).observe(edge.encode_ms / 1e3)
            if edge.capture_time_us > 0:
                lag = time.time() - edge.capture_time_us / 1e6
                if 0 <= lag < 3600:  # clocks of edge and server disagree otherwise; do not record junk
                    m.e2e.labels(bid).observe(lag)
            if edge.novelty > 0:
                m.novelty.labels(bid).observe(edge.novelty)
            if edge.fallback:
                m.fallbacks.labels(bid).inc()
        # Only a picture somebody asked for is kept: the sender set want_preview, or ran the task
        # whose one result is the picture. Another task's runner may rebuild x̂ without it.
        if (want_preview or task == "preview") and br.output.preview_jpeg:
            self.previews.put(key, br.output.preview_jpeg, preview_owner)
        summary.update(codec=decoded.codec, level=decoded.level, bpp=bpp, truncated=decoded.truncated,
                       novelty=round(result.novelty, 6) if result.novelty else None,
                       fallback=result.fallback or None,
                       image=[w, h], boxes=len(br.output.boxes), masks=len(br.output.masks),
                       landmarks=len(br.output.landmarks), batch=br.batch_size,
                       detections=[[b.class_name, round(b.score, 3)] for b in br.output.boxes[:8]],
                       timings=asdict(result.timings))
        self._remember(summary)
        return key, result

    @contextmanager
    def open_stream(self, bundle: str, task: str, client: str = "", want_preview: bool = False, *,
                    slot: str | None = None, limit_key: str | None = None) -> Iterator[StreamSession]:
        """Validate a stream header (bundle, task, stream limits) and account for the open stream.

        ``slot``: the key of a slot the transport took when the call arrived (:attr:`slots`); it is
        re-keyed to ``limit_key`` (default ``client``) and stays the caller's to release. Without it a
        slot is taken and released here."""
        check_name(bundle, "bundle name")
        check_name(task, "task name")
        client = clip(client, 2 * MAX_NAME + 1)
        lb = self.resolve(bundle)
        task, _ = self._batcher(lb, task)
        session = StreamSession(self, lb.bundle.id, task, client, want_preview)
        key = clip(limit_key or client, 2 * MAX_NAME + 1)
        session.key = key
        own = slot is None
        try:
            if own:
                self.slots.acquire(key)
            else:
                self.slots.move(slot, key)  # type: ignore[arg-type]
        except ResourceExhausted:
            self.metrics.streams_refused.labels("limit").inc()
            raise
        with self._lock:
            self._streams[id(session)] = session
        self.metrics.active_streams.inc()
        try:
            yield session
        finally:
            closed = dict(session.stats(), closed=time.time())
            self.previews.release(session.sid)
            with self._lock:
                self._streams.pop(id(session), None)
                self._closed.append(closed)
            self.metrics.active_streams.dec()
            if own:
                self.slots.release(key)

    # -- introspection ---------------------------------------------------------------------------

    def _remember(self, summary: dict[str, Any]) -> None:
        with self._lock:
            self._recent.append(summary)

    def recent_frames(self, limit: int = 50) -> list[dict[str, Any]]:
        """Newest first, each saying whether its preview is still stored (``preview``, ``preview_url``)."""
        with self._lock:
            items = list(self._recent)
        return [self.with_preview(f) for f in items[::-1][: max(0, limit)]]

    def with_preview(self, frame: dict[str, Any] | None) -> dict[str, Any] | None:
        """A copy of a frame's JSON (a recent-frames entry, a stream's last frame) with ``preview``:
        whether the store still holds its picture, and then ``preview_url``, where it is served."""
        if frame is None:
            return None
        key = frame.get("key")
        out = {k: v for k, v in frame.items() if k not in ("preview", "preview_url")}
        out["preview"] = key is not None and key in self.previews
        if out["preview"]:
            out["preview_url"] = PREVIEW_PATH.format(key=key)
        return out

    def preview(self, key: int) -> bytes:
        """The stored preview JPEG of frame ``key``, else :class:`PreviewGone` (HTTP 404)."""
        jpeg = self.previews.get(key)
        if jpeg is None:
            raise PreviewGone(f"no preview of frame {key}: none was asked for (want_preview) or the "
                              f"store (the newest {self.previews.max_items} pictures, "
                              f"{self.previews.max_bytes >> 20} MiB) no longer holds it")
        return jpeg

    def streams(self) -> list[dict[str, Any]]:
        with self._lock:
            sessions = list(self._streams.values())
        return [{"client": s.client, "bundle": s.bundle, "task": s.task, "opened": s.opened,
                 "frames": s.frames, "bytes": s.n_bytes, "errors": s.errors, "queued": s.queued,
                 "refused": s.refused} for s in sessions]

    def stream_stats(self) -> dict[str, list[dict[str, Any]]]:
        """The dashboard's view: open streams with rates, latency and last frame; recently closed."""
        with self._lock:
            sessions = list(self._streams.values())
            closed = list(self._closed)[::-1]
        return {"open": [s.stats() for s in sessions],
                "closed": [dict(c, last=self.with_preview(c.get("last"))) for c in closed]}

    def info(self) -> list[BundleInfo]:
        return [lb.info() for lb in self.bundles.values()]

    def status(self) -> dict[str, Any]:
        """Everything the dashboard shows, as JSON-ready data."""
        return {
            "server_version": __version__, "ready": self.ready, "device": self.device,
            "uptime_s": time.time() - self.started, "bundles": [asdict(b) for b in self.info()],
            "load_errors": dict(self.load_errors), "streams": self.streams(),
            "queues": {f"{k}:{t}": b.depth() for k, lb in self.bundles.items()
                       for t, b in lb.batchers.items()},
            "draining": self.draining,
            "limits": {"max_streams": self.slots.total, "max_streams_per_client": self.slots.per_client,
                       "streams_in_use": self.slots.in_use, "max_pending_frames": self.admission.max_pending,
                       "max_stream_queue": self.admission.max_per_stream,
                       "pending_frames": self.admission.pending,
                       "stream_idle_timeout_s": self.stream_idle_timeout,
                       "header_timeout_s": self.header_timeout},
        }
