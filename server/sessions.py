"""Open streams: each one's session (:class:`StreamSession`: bundle and task fixed by its header, its
counters and the dashboard's rolling window) and the registry of open and recently closed streams
(:class:`Streams`) that ``/api/info``, ``/api/streams`` and the Live page read. What the dashboard
shows of a frame's task output is :func:`output_json`, bounded whatever a task returns.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from server.results import EdgeReport, FrameResult, TaskOutput

HISTORY = 60  # frames of each stream kept for the dashboard's rates and sparklines
MAX_LAST_BOXES = 100
# What of a frame's masks and landmarks the dashboard's JSON carries (the SSE event repeats it every
# second for every open stream, so it stays bounded whatever a task returns).
MAX_LAST_MASKS = 4
MAX_MASK_RUNS = 20_000  # runs of one mask (a person at 1080p: a few thousand); noisier ones are left out
MAX_LAST_LANDMARKS = 16  # landmark sets: faces (468 points each) or people (17 keypoints each)
CLOSED_STREAMS = 8  # recently closed streams the dashboard lists
_stream_ids = itertools.count(1)


class FrameService(Protocol):
    """What a stream needs of :class:`server.service.Service`."""

    def analyze_keyed(self, bundle: str, task: str, payload: bytes, want_preview: bool = False, *,
                      frame_id: int = 0, client: str = "", edge: EdgeReport | None = None,
                      admit: bool = True, preview_owner: Hashable | None = None,
                      admission_key: str | None = None) -> tuple[int, FrameResult]: ...

    def with_preview(self, frame: dict[str, Any] | None) -> dict[str, Any] | None: ...


def output_json(out: TaskOutput) -> dict[str, Any]:
    """A task output as the dashboard's JSON: boxes, masks (run-length counts as on the wire) and
    landmark sets, each bounded (``MAX_LAST_*``); the preview goes to the
    :class:`~server.previews.PreviewStore`."""
    masks = [{"width": mk.width, "height": mk.height, "counts": list(mk.counts), "class_id": mk.class_id,
              "score": mk.score} for mk in out.masks[:MAX_LAST_MASKS] if len(mk.counts) <= MAX_MASK_RUNS]
    landmarks = [{"scheme": ls.scheme, "score": ls.score,
                  "points": [[round(float(x), 1), round(float(y), 1), round(float(v), 3)]
                             for x, y, v in ls.points]} for ls in out.landmarks[:MAX_LAST_LANDMARKS]]
    return {"boxes": [asdict(b) for b in out.boxes[:MAX_LAST_BOXES]], "masks": masks, "landmarks": landmarks}


@dataclass
class StreamSession:
    """One open Stream: bundle and task fixed by its header; frames go through :meth:`analyze`."""

    service: FrameService
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
    key: str = ""  # whose stream limits and fair share of admission it counts in (see Service.open_stream)
    # The dashboard's rolling window: (time, bytes, codec, level, server ms) of the last frames, and
    # the newest frame's boxes. Bounded: HISTORY frames, MAX_LAST_BOXES boxes.
    history: deque[tuple[float, int, str, int, float]] = field(default_factory=lambda: deque(maxlen=HISTORY))
    last: dict[str, Any] | None = None

    def analyze(self, frame_id: int, payload: bytes, edge: EdgeReport | None = None,
                admitted: bool = False) -> FrameResult:
        """One frame of this stream; ``admitted``: the transport already counted it in
        (:meth:`server.admission.Admission.admit`), else it is admitted here."""
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

    def summary(self) -> dict[str, Any]:
        """The stream's totals (an entry of ``/api/info``'s ``streams``)."""
        return {"client": self.client, "bundle": self.bundle, "task": self.task, "opened": self.opened,
                "frames": self.frames, "bytes": self.n_bytes, "errors": self.errors, "queued": self.queued,
                "refused": self.refused}

    def stats(self, window_s: float = 10.0) -> dict[str, Any]:
        """What the dashboard shows of this stream: totals, rates over the last ``window_s`` seconds,
        server-latency percentiles and the per-frame series of the rolling window."""
        hist = list(self.history)
        recent = [h for h in hist if h[0] >= time.time() - window_s]
        span = recent[-1][0] - recent[0][0] if len(recent) > 1 else 0.0
        lat = sorted(h[4] for h in hist)

        def pct(q: float) -> float | None:
            return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else None

        return {"id": self.sid, **self.summary(),
                "codec": hist[-1][2] if hist else None, "level": hist[-1][3] if hist else None,
                "kbps": sum(h[1] for h in recent[1:]) * 8 / 1e3 / span if span > 0 else None,
                "fps": (len(recent) - 1) / span if span > 0 else None,
                "latency_p50_ms": pct(0.5), "latency_p95_ms": pct(0.95),
                "series": {"kbit": [h[1] * 8 / 1e3 for h in hist], "level": [h[3] for h in hist]},
                "last": self.service.with_preview(self.last)}




class Streams:
    """The open streams and the last :data:`CLOSED_STREAMS` closed ones. Thread-safe."""

    def __init__(self, closed: int = CLOSED_STREAMS) -> None:
        self._lock = threading.Lock()
        self._open: dict[int, StreamSession] = {}
        self._closed: deque[dict[str, Any]] = deque(maxlen=closed)

    def opened(self, session: StreamSession) -> None:
        with self._lock:
            self._open[id(session)] = session

    def closed(self, session: StreamSession) -> None:
        """``session`` ended: it leaves the open streams and heads the closed ones (its stats then)."""
        closed = dict(session.stats(), closed=time.time())
        with self._lock:
            self._open.pop(id(session), None)
            self._closed.append(closed)

    def summaries(self) -> list[dict[str, Any]]:
        """The open streams' totals (``/api/info``)."""
        with self._lock:
            sessions = list(self._open.values())
        return [s.summary() for s in sessions]

    def stats(self, with_preview: Callable[[dict[str, Any] | None], dict[str, Any] | None]
              ) -> dict[str, list[dict[str, Any]]]:
        """The dashboard's view: open streams with rates, latency and last frame; recently closed,
        their last frame's ``preview`` as the store holds it now (``with_preview``)."""
        with self._lock:
            sessions = list(self._open.values())
            closed = list(self._closed)[::-1]
        return {"open": [s.stats() for s in sessions],
                "closed": [dict(c, last=with_preview(c.get("last"))) for c in closed]}
