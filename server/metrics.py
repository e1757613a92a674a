"""Prometheus metrics of one :class:`~server.service.Service`.

Each service owns its own :class:`~prometheus_client.CollectorRegistry` (not the global default), so
several servers can live in one process (tests) without clashing. Latencies are in seconds, as
Prometheus expects; labels stay low-cardinality (bundle, codec, level, task, status; never client
or frame ids).

Every series the Grafana dashboard and the alert rules query exists from start-up, at 0, for each label
value known then (:meth:`Metrics.init_series`: the reasons, outcomes and statuses below; the bundles,
codecs, levels and tasks once they are loaded), so a healthy server shows 0, not "No data", and
``rate()`` sees the first burst.

Alert thresholds follow the serving device: ``palettelink_frame_cost_seconds{bundle, task, device,
device_kind}`` is the per-frame cost measured at start-up (one warmed-up task run at batch 1 on the
serving device), and the latency alert compares p95 server time with ``max(LATENCY_FACTOR × cost,
floor)`` where the floor is that of the device kind (see deploy/prometheus/alerts.yml).
"""

from __future__ import annotations

import platform
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from server import __version__

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BPP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
NOVELTY_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# gRPC calls: unary ones take milliseconds, a Stream lasts as long as its client streams.
CALL_BUCKETS = LATENCY_BUCKETS + (30.0, 60.0, 300.0, 1800.0)

# The label values known before any event (each series is created at 0 by :meth:`Metrics.init_series`).
FRAME_REFUSAL_REASONS = ("server_queue", "latency", "client_share", "unary_calls", "try_uploads")
STREAM_REFUSAL_REASONS = ("limit", "workers")
IDLE_REASONS = ("header", "frame")
# How a Stream call ended: the edge closed it (ok), the client aborted it (cancelled), a deadline or idle
# timeout ended it (deadline), a limit or the token check refused it (refused), anything else (error).
STREAM_OUTCOMES = ("ok", "cancelled", "deadline", "refused", "error")
# Every status an answer can carry but OK (google.rpc.Code names).
ERROR_STATUSES = ("CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
                  "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
                  "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
                  "UNAUTHENTICATED")
# The statuses a coded frame can be answered with (palettelink.errors and the server's own refusals).
FRAME_ERROR_STATUSES = ("INVALID_ARGUMENT", "FAILED_PRECONDITION", "NOT_FOUND", "RESOURCE_EXHAUSTED",
                        "UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL")
# The final codes of a gRPC call created at 0 per method (a Stream's outcomes among them).
CALL_CODES = ("OK", "CANCELLED", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "UNAUTHENTICATED",
              "INVALID_ARGUMENT", "NOT_FOUND", "INTERNAL")
STREAM_METHOD = "palettelink.v1.PaletteLink/Stream"
UNKNOWN = "unknown"  # the bundle / codec label of a frame error about none loaded here


def device_kind(device: str) -> str:
    """``gpu`` for a CUDA/ROCm/MPS torch device, ``cpu`` otherwise (the alert floors differ)."""
    return "gpu" if device.split(":", 1)[0] in ("cuda", "mps", "xpu") else "cpu"


def stream_outcome(code: str) -> str:
    """The outcome label of a Stream call that ended with status ``code``."""
    return {"OK": "ok", "CANCELLED": "cancelled", "DEADLINE_EXCEEDED": "deadline",
            "RESOURCE_EXHAUSTED": "refused", "UNAUTHENTICATED": "refused",
            "PERMISSION_DENIED": "refused"}.get(code, "error")


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        # process_* (CPU seconds, RSS, open fds, start time; Linux /proc), python_info, python_gc_*.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        p = "palettelink_"
        self.build_info = Gauge(p + "build_info", "Always 1: server version, Python version and the bundles "
                                "loaded (comma-separated ids, empty while loading)",
                                ["version", "python", "bundles"], registry=r)
        self.set_bundles([])
        self.frames = Counter(p + "frames_received", "Coded frames received",
                              ["bundle", "codec", "level"], registry=r)
        self.bytes = Counter(p + "bytes_received", "Coded payload bytes received",
                             ["bundle", "codec", "level"], registry=r)
        self.bpp = Histogram(p + "frame_bpp", "Bits per pixel of the original image", ["bundle", "codec"],
                             buckets=BPP_BUCKETS, registry=r)
        self.decode = Histogram(p + "decode_seconds", "Bitstream → tensors", ["bundle", "codec"],
                                buckets=LATENCY_BUCKETS, registry=r)
        self.task = Histogram(p + "task_seconds", "Task model time per batch", ["bundle", "task"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram(p + "queue_seconds", "Wait for the task worker", ["bundle", "task"],
                               buckets=LATENCY_BUCKETS, registry=r)
        self.total = Histogram(p + "frame_seconds", "Server time per frame, decode to results",
                               ["bundle", "task"], buckets=LATENCY_BUCKETS, registry=r)
        self.edge_front = Histogram(p + "edge_front_seconds", "Edge front time reported by clients",
                                    ["bundle"], buckets=LATENCY_BUCKETS, registry=r)
        self.edge_encode = Histogram(p + "edge_encode_seconds", "Edge encode time reported by clients",
                                     ["bundle"], buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(p + "capture_to_result_seconds", "Capture (edge clock) to result (server clock)",
                             ["bundle"], buckets=LATENCY_BUCKETS, registry=r)
        self.novelty = Histogram(
            p + "frame_novelty", "The edge's novelty of each frame: mean squared distance of its latent to "
            "the nearest palette entries (above the bundle's calibrated threshold the frame lies outside "
            "what the codec learned)", ["bundle"], buckets=NOVELTY_BUCKETS, registry=r)
        self.fallbacks = Counter(p + "frames_fallback", "Frames the edge sent at a finer level (or flagged) "
                                 "because they were novel", ["bundle"], registry=r)
        self.batch = Histogram(p + "batch_size", "Frames per task batch", ["bundle", "task"],
                               buckets=BATCH_BUCKETS, registry=r)
        self.active_streams = Gauge(p + "active_streams", "Open Stream calls", registry=r)
        self.pending = Gauge(p + "pending_frames", "Frames admitted and not answered yet (admission control)",
                             registry=r)
        self.stream_queue = Histogram(p + "stream_queue_depth",
                                      "Frames waiting in their stream when one more arrives",
                                      buckets=(0, 1, 2, 4, 8, 16, 32), registry=r)
        self.refused = Counter(p + "frames_refused",
                               "Frames refused with RESOURCE_EXHAUSTED, by reason: server_queue (admission "
                               "limit), latency (shedding), client_share (a client over its fair share "
                               "of the limit), unary_calls (Analyze calls in flight), "
                               "try_uploads (Try-it uploads in flight)",
                               ["reason"], registry=r)
        self.streams_refused = Counter(p + "streams_refused", "Stream calls refused, by reason: limit (--max-"
                                       "streams, --max-streams-per-client), workers (all --workers busy)",
                                       ["reason"], registry=r)
        self.streams_throttled = Counter(p + "streams_throttled", "Pauses longer than the retry hint imposed "
                                         "on a stream refused again and again (its client ignores hints): "
                                         "it is not read meanwhile", registry=r)
        self.streams_closed = Counter(p + "streams_closed_idle", "Streams closed by the server for idling: "
                                      "no header in time, or no frame within --stream-idle-timeout",
                                      ["reason"], registry=r)
        self.errors = Counter(p + "errors", "Errors answered, by status code", ["status"], registry=r)
        self.frame_errors = Counter(p + "frame_errors", "Coded frames answered with an error (gRPC Stream "
                                    "frames and Analyze calls), by bundle (unknown: not loaded here), codec "
                                    "(from the frame header; unknown: unreadable) and status",
                                    ["bundle", "codec", "status"], registry=r)
        self.grpc_requests = Counter(p + "grpc_requests", "gRPC calls finished, by method and status code",
                                     ["method", "code"], registry=r)
        self.grpc_seconds = Histogram(p + "grpc_request_seconds", "gRPC call duration, by method (a Stream: "
                                      "its whole life)", ["method"], buckets=CALL_BUCKETS, registry=r)
        self.bundles_loaded = Gauge(p + "bundles_loaded", "Bundles loaded and serving", registry=r)
        self.ready = Gauge(p + "ready", "1 while /readyz answers 200 (bundles loaded, not draining), else 0",
                           registry=r)
        self.streams_ended = Counter(p + "streams", "Stream calls finished, by outcome: ok (the edge closed "
                                     "it), cancelled (the client aborted), deadline (a deadline or idle "
                                     "timeout), refused (a limit or the token check), error",
                                     ["outcome"], registry=r)
        self.frame_cost = Gauge(p + "frame_cost_seconds", "Per-frame task cost measured at start-up (one "
                                "warmed-up run at batch 1 on the serving device); the latency alert's "
                                "threshold derives from it", ["bundle", "task", "device", "device_kind"],
                                registry=r)
        self.init_series()

    def init_series(self, bundles: dict[str, dict[str, Any]] | None = None,
                    methods: list[str] | None = None) -> None:
        """Create at 0 every series whose label values are known: the reasons, outcomes and statuses
        above; for each loaded bundle (``{id: {"codecs": {name: [levels]}, "tasks": [...]}}``) its
        codecs, levels and tasks; for each gRPC ``method`` its call counters. Idempotent."""
        for reason in FRAME_REFUSAL_REASONS:
            self.refused.labels(reason)
        for reason in STREAM_REFUSAL_REASONS:
            self.streams_refused.labels(reason)
        for reason in IDLE_REASONS:
            self.streams_closed.labels(reason)
        for outcome in STREAM_OUTCOMES:
            self.streams_ended.labels(outcome)
        for status in ERROR_STATUSES:
            self.errors.labels(status)
        ids = [UNKNOWN, *(bundles or {})]
        all_codecs = sorted({c for b in (bundles or {}).values() for c in b.get("codecs", {})})
        for bid in ids:
            info = (bundles or {}).get(bid, {})
            known = all_codecs if bid == UNKNOWN else list(info.get("codecs") or {})
            for codec in [*known, UNKNOWN]:
                for status in FRAME_ERROR_STATUSES:
                    self.frame_errors.labels(bid, codec, status)
        for bid, info in (bundles or {}).items():
            for codec, levels in (info.get("codecs") or {}).items():
                for level in levels:
                    self.frames.labels(bid, codec, str(level))
                    self.bytes.labels(bid, codec, str(level))
                self.bpp.labels(bid, codec)
                self.decode.labels(bid, codec)
            for task in info.get("tasks") or []:
                for h in (self.task, self.queue, self.total, self.batch):
                    h.labels(bid, task)
            for h in (self.edge_front, self.edge_encode, self.e2e, self.novelty, self.fallbacks):
                h.labels(bid)
        for method in methods or []:
            self.grpc_seconds.labels(method)
            for code in CALL_CODES:
                self.grpc_requests.labels(method, code)

    def set_bundles(self, bundle_ids: list[str]) -> None:
        """The build-info series, with the bundles now loaded (one series at a time)."""
        self.build_info.clear()
        self.build_info.labels(__version__, platform.python_version(), ",".join(sorted(bundle_ids))).set(1)

    def count_error(self, status: str, bundle: str | None = None, codec: str | None = None) -> None:
        """Count an error by status; one about a coded frame (``bundle`` given) also by bundle and codec."""
        self.errors.labels(status).inc()
        if bundle is not None:
            self.frame_errors.labels(bundle, codec or "unknown", status).inc()

    def count_call(self, method: str, code: str, seconds: float) -> None:
        """A finished gRPC call; a Stream's also by its outcome (:func:`stream_outcome`)."""
        self.grpc_requests.labels(method, code).inc()
        self.grpc_seconds.labels(method).observe(seconds)
        if method == STREAM_METHOD:
            self.streams_ended.labels(stream_outcome(code)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
