"""A small batching queue: frames from all streams for one (bundle, task) meet here.

One worker thread owns the task runner, so the model is never entered by two threads at once (the
lock is the queue). It takes the first waiting frame, waits at most ``max_wait_ms`` for more, up to
``max_batch``, and runs them in one call: frames that queued up while the model was busy go through
together, which is where throughput under load comes from (on a GPU most of all). A full queue
refuses work (RESOURCE_EXHAUSTED) rather than letting latency grow without bound.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from palettelink.codecs import Decoded
from palettelink.errors import ResourceExhausted, ServiceUnavailable
from server.results import TaskOutput
from server.tasks import TaskRunner

log = logging.getLogger("palettelink.server")


@dataclass
class BatchResult:
    output: TaskOutput
    queue_ms: float
    task_ms: float
    batch_size: int


@dataclass
class _Job:
    decoded: Decoded
    want_preview: bool
    enqueued: float = field(default_factory=time.perf_counter)
    future: Future[BatchResult] = field(default_factory=Future)


_STOP = object()


class Batcher:
    """Serialises (and batches) calls into one :class:`~server.tasks.TaskRunner`."""

    def __init__(self, runner: TaskRunner, *, name: str, max_batch: int = 1, max_wait_ms: float = 2.0,
                 max_queue: int = 64, on_batch: Callable[[int], None] | None = None) -> None:
        self.runner = runner
        self.name = name
        self.max_batch = max(1, max_batch)
        self.max_wait = max(0.0, max_wait_ms) / 1e3
        self.on_batch = on_batch
        self._q: queue.Queue[_Job | object] = queue.Queue(maxsize=max(1, max_queue))
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    def submit(self, decoded: Decoded, want_preview: bool = False) -> BatchResult:
        """Run the task on one decoded frame; blocks until its batch is done."""
        if self._closed:
            raise ServiceUnavailable("server is shutting down")
        job = _Job(decoded, want_preview)
        try:
            self._q.put_nowait(job)
        except queue.Full:
            raise ResourceExhausted(f"{self.name}: {self._q.maxsize} frames already queued; "
                                    "slow down or add replicas") from None
        return job.future.result()

    def depth(self) -> int:
        return self._q.qsize()

    def close(self, timeout: float = 5.0) -> None:
        """Finish what is queued, then stop the worker."""
        if self._closed:
            return
        self._closed = True
        self._q.put(_STOP)
        self._thread.join(timeout)

    def _loop(self) -> None:
        self._serve()
        while True:  # anything that slipped in after the stop marker gets a clear answer
            try:
                job = self._q.get_nowait()
            except queue.Empty:
                return
            if isinstance(job, _Job):
                job.future.set_exception(ServiceUnavailable("server is shutting down"))

    def _serve(self) -> None:
        while True:
            first = self._q.get()
            if first is _STOP:
                return
            batch: list[_Job] = [first]  # type: ignore[list-item]
            deadline = time.perf_counter() + self.max_wait
            stop = False
            while len(batch) < self.max_batch:
                remaining = deadline - time.perf_counter()
                try:
                    nxt = self._q.get(timeout=remaining) if remaining > 0 else self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                batch.append(nxt)  # type: ignore[arg-type]
            self._run(batch)
            if stop:
                return

    def _run(self, batch: list[_Job]) -> None:
        # Frames asking for a preview and frames not asking run as separate calls.
        for want in (False, True):
            jobs = [j for j in batch if j.want_preview is want]
            if jobs:
                self._run_group(jobs, want)

    def _run_group(self, jobs: list[_Job], want_preview: bool) -> None:
        start = time.perf_counter()
        try:
            outputs = self.runner.run_batch([j.decoded for j in jobs], want_preview)
            if len(outputs) != len(jobs):
                raise RuntimeError(f"runner returned {len(outputs)} results for {len(jobs)} frames")
        except Exception as e:
            if len(jobs) > 1:  # find the frame that failed; the others still get answers
                for j in jobs:
                    self._run_group([j], want_preview)
                return
            jobs[0].future.set_exception(e)
            return
        task_ms = (time.perf_counter() - start) * 1e3
        if self.on_batch is not None:
            self.on_batch(len(jobs))
        for j, out in zip(jobs, outputs, strict=True):
            j.future.set_result(BatchResult(out, (start - j.enqueued) * 1e3, task_ms, len(jobs)))
