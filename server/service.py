"""The one data plane: decode → task → results, with timings and metrics.

Both transports (``grpc_service``, ``http_app``) are a few lines over :class:`Service`; all the real
work and every check lives here, so the two behave the same and are tested once. Every failure is a
:class:`~palettelink.errors.PaletteLinkError` (or a bug); transports map them in ``server/errors.py``.

The service composes the parts beside it: the loaded bundles and what ``GetInfo`` says of them
(``server/info.py``), stream slots and admission control (``server/admission.py``), the recent
frames and their pictures (``server/previews.py``) and the open streams (``server/sessions.py``).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
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
from server import __version__
from server.admission import Admission, StreamSlots
from server.batching import Batcher
from server.errors import MAX_NAME, check_name, clip
from server.info import BundleInfo, LoadedBundle, version_key
from server.metrics import Metrics, device_kind
from server.previews import PREVIEW_BYTES, PREVIEW_FRAMES, RECENT_FRAMES, RecentFrames
from server.results import EdgeReport, FrameResult, Timings
from server.sessions import Streams, StreamSession
from server.tasks import MODULES, make_runner, tasks_for

log = logging.getLogger("palettelink.server")


class Service:
    """Loads bundles and answers frames. Thread-safe: transports call it from many threads.

    ``device`` is the torch device of the task models; ``threads`` caps torch's intra-op threads
    (default: the CPUs this process may run on, which in a container can be far fewer than the
    host's cores torch would otherwise use). Frames that wait while the model runs are batched, up
    to ``max_batch``; a lone frame waits at most ``batch_wait_ms`` for company. ``max_batch`` None
    decides per task: 1 where its runner is onnxruntime on the CPU (a batch of frames costs there what
    they cost one by one, so waiting for company only adds latency: issue 17), else 8 (the torch tail:
    on 2 cores a batch of 4 cost ~3× one frame, not 4×; a GPU).
    """

    def __init__(self, bundles_root: str | os.PathLike[str], bundles: Sequence[str] | None = None, *,
                 device: str = "cpu", threads: int | None = None, max_batch: int | None = 8,
                 batch_wait_ms: float = 2.0, max_queue: int = 64, max_streams: int = 64,
                 max_streams_per_client: int = 16, max_pending: int = 32, max_stream_queue: int = 4,
                 shed_latency_ms: float = 2000.0,
                 stream_idle_timeout: float = 60.0, header_timeout: float = 5.0,
                 max_pixels: int = 1 << 26, recent_frames: int = RECENT_FRAMES, warmup: bool = True,
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
        # The recent frames the dashboard lists, and the pictures of those whose sender asked for one
        # (want_preview, or task preview).
        self.frames = RecentFrames(recent_frames, preview_frames, preview_bytes)
        self.previews = self.frames.previews
        self.sessions = Streams()  # open streams and the dashboard's recently closed ones
        self.slots = StreamSlots(max_streams, max_streams_per_client)
        self.admission = Admission(self.metrics, max_pending, max_stream_queue, shed_latency_ms,
                                   floor=max(2, max_batch or 2))
        # A stream refused again and again is left unread a while (server.grpc_inbox.Inbox._hold).
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
        windowed = True  # every runner reads windowed tensors (the onnxruntime YOLO tail)
        for task in tasks_for(bundle):
            runner = make_runner(task, bundle, self.device)
            windowed = windowed and bool(getattr(runner, "accepts_window", False))
            self._set_torch_threads()
            if self.warmup:
                runner.warmup()
                t0 = time.perf_counter()  # a second, warm run: the per-frame cost on this device
                runner.warmup()
                cost = self.frame_costs[(bundle.id, task)] = time.perf_counter() - t0
                kind = device_kind(self.device)
                self.metrics.frame_cost.labels(bundle.id, task, self.device, kind).set(cost)
            batchers[task] = Batcher(
                runner, name=f"{bundle.id}:{task}", max_batch=self._max_batch(runner),
                max_wait_ms=self.batch_wait_ms, max_queue=self.max_queue,
                on_batch=self.metrics.batch.labels(bundle.id, task).observe,
            )
        if not batchers:
            raise InvalidRequest(f"bundle {bundle.id} has task {bundle.task!r}; "
                                 f"this server runs {sorted(MODULES)}")
        decoder = codecs.Decoder(bundle, self._decoders(bundle, windowed))
        self.bundles[bundle.id] = LoadedBundle(bundle, decoder, batchers)
        log.info("loaded bundle %s from %s", bundle.id, bundle.path)

    def _max_batch(self, runner: Any) -> int:
        """``max_batch``, or where it is None: 1 for an onnxruntime runner on the CPU, else 8."""
        if self.max_batch is not None:
            return self.max_batch
        on_cpu = not self.device.startswith("cuda")
        return 1 if on_cpu and getattr(runner, "runtime", "torch") == "onnxruntime" else 8

    def _decoders(self, bundle: Bundle, windowed: bool) -> dict[str, Any]:
        """Codec decoders that differ from the library's: where the task runners read windowed
        tensors, the palette decoder of the onnxruntime path (the frame's window of the latent, int8
        where the bundle measured it agreeing; palettelink.models.windowed_palette)."""
        from palettelink.models.windowed_palette import CODEC, WindowedPaletteDecoder

        if not windowed or CODEC not in codecs.available(bundle):
            return {}
        return {CODEC: WindowedPaletteDecoder(bundle)}

    def _set_torch_threads(self) -> None:
        if "torch" not in sys.modules or not self.device.startswith("cpu"):
            return
        import torch

        from palettelink.cpu import usable_cpus

        n = self.threads or usable_cpus()  # affinity and cgroup quota, like onnxruntime's sessions
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
        return max(versions, key=lambda lb: version_key(lb.bundle.version))

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
        key = self.frames.next_key()
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
            self.frames.remember(summary)
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
        self.frames.remember(summary)
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
        self.sessions.opened(session)
        self.metrics.active_streams.inc()
        try:
            yield session
        finally:
            self.sessions.closed(session)
            self.previews.release(session.sid)
            self.metrics.active_streams.dec()
            if own:
                self.slots.release(key)

    # -- introspection ---------------------------------------------------------------------------

    def recent_frames(self, limit: int = 50) -> list[dict[str, Any]]:
        """Newest first, each saying whether its preview is still stored (``preview``, ``preview_url``)."""
        return self.frames.newest(limit)

    def with_preview(self, frame: dict[str, Any] | None) -> dict[str, Any] | None:
        """:meth:`RecentFrames.with_preview <server.previews.RecentFrames.with_preview>`."""
        return self.frames.with_preview(frame)

    def preview(self, key: int) -> bytes:
        """The stored preview JPEG of frame ``key``, else :class:`~server.previews.PreviewGone` (404)."""
        return self.frames.preview(key)

    def streams(self) -> list[dict[str, Any]]:
        return self.sessions.summaries()

    def stream_stats(self) -> dict[str, list[dict[str, Any]]]:
        """The dashboard's view: open streams with rates, latency and last frame; recently closed."""
        return self.sessions.stats(self.with_preview)

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
