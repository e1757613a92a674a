"""Prometheus metrics of one :class:`~server.service.Service`.

Each service owns its own :class:`~prometheus_client.CollectorRegistry` (not the global default), so
several servers can live in one process (tests) without clashing. Latencies are in seconds, as
Prometheus expects; labels stay low-cardinality (bundle, codec, level, task, status; never client
or frame ids).
"""

from __future__ import annotations

import platform

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
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# gRPC calls: unary ones take milliseconds, a Stream lasts as long as its client streams.
CALL_BUCKETS = LATENCY_BUCKETS + (30.0, 60.0, 300.0, 1800.0)


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
                               "limit), latency (shedding), unary_calls (Analyze calls in flight)",
                               ["reason"], registry=r)
        self.streams_refused = Counter(p + "streams_refused", "Stream calls refused by the stream limits",
                                       ["reason"], registry=r)
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
        self.grpc_requests.labels(method, code).inc()
        self.grpc_seconds.labels(method).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
