"""The request side of one gRPC Stream (:class:`Inbox`): read by a thread of its own, so that the
servicer waits with a timeout (idle streams are closed: :class:`StreamIdle`), frames over admission
control are refused on arrival, a stream's queue is bounded by not reading it (HTTP/2 flow control
holds the sender), and a stream refused again and again is left unread a while.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from palettelink.errors import PaletteLinkError, ResourceExhausted
from palettelink.v1 import palettelink_pb2 as pb
from server.grpc_convert import frame_error, frame_labels
from server.service import Service
from server.sessions import StreamSession


class StreamIdle(PaletteLinkError):
    """A stream closed by the server: no header in time, or no frame within the idle timeout."""

    code = "DEADLINE_EXCEEDED"

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


WAKE = object()  # queued when a refused frame's answer waits: the handler yields it
_END = object()  # queued when the client closed its side
MAX_THROTTLE_MS = 10_000  # the longest a refused stream is left unread


class Inbox:
    """The request side of one Stream, read by its own thread so that the handler can wait with a
    timeout (idle streams are closed), frames over the global admission limit are refused on arrival,
    not queued, and a stream with ``max_stream_queue`` frames waiting is not read further (flow
    control holds its sender). Frames admitted here are counted out by :meth:`done_one` (or :meth:`close`)."""

    def __init__(self, requests: Iterator[pb.StreamRequest], service: Service) -> None:
        self.service = service
        self.session: StreamSession | None = None
        self._q: queue.Queue[Any] = queue.Queue()
        self._refused: deque[pb.FrameResult] = deque()
        self._lock = threading.Condition()
        self._closed = False
        self._waiting = 0  # admitted frames of this stream not answered yet
        self.last_admitted = False  # whether the request :meth:`get` returned last was admitted
        self.undelivered = False  # the last answer was yielded after the call had ended
        self._strikes = 0  # refusals in a row (no frame admitted in between)
        self._hold_until = 0.0  # monotonic time before which the stream is not read (throttled)
        self._thread = threading.Thread(target=self._read, args=(requests,), name="stream-inbox", daemon=True)
        self._thread.start()

    def _read(self, requests: Iterator[pb.StreamRequest]) -> None:
        try:
            for req in requests:
                self._admit(req)
                self._throttle()
        except Exception as e:  # the call was cancelled or broke: the handler re-raises it
            self._q.put(e)
        else:
            self._q.put(_END)

    def _admit(self, req: pb.StreamRequest) -> None:
        """Count a frame in and queue it, or refuse it at once (its answer queued in refusals). Under
        the lock, so that :meth:`close` counts out every admitted frame."""
        session = self.session
        if session is None or req.WhichOneof("msg") != "frame":
            with self._lock:
                if not self._closed:
                    self._q.put((req, False))
                return
        svc = self.service
        with self._lock:
            svc.metrics.stream_queue.observe(self._waiting)
            # A full stream queue stops reading: flow control then holds the sender.
            while self._waiting >= svc.admission.max_per_stream and not self._closed:
                self._lock.wait(0.5)
            if self._closed:
                return
            try:
                svc.admission.admit(session.key)
            except ResourceExhausted as e:
                pause = self._hold(e.retry_after_ms)
                if pause > e.retry_after_ms:  # the hint says when this stream is read again
                    e = ResourceExhausted(f"{e}; this stream is throttled for {pause} ms after "
                                          f"{self._strikes} refusals in a row", pause)
                session.refused += 1
                labels = frame_labels(svc, session.bundle, req.frame.payload)
                self._refused.append(frame_error(req.frame, e, svc.metrics, labels))
                self._q.put(WAKE)
                return
            self._strikes = 0
            self._waiting += 1
            session.queued = self._waiting
            self._q.put((req, True))

    def _hold(self, hint_ms: int) -> int:
        """After a refusal: this stream is not read again for the retry hint, doubled for each refusal
        in a row (up to 10 s, and half the idle timeout). A client that ignores hints is held back by
        HTTP/2 flow control instead of being answered at once, so its resends cost the server (and the
        other clients) next to nothing; one that waits as told never notices. Returns the pause (ms)."""
        if not self.service.throttle_streams:
            return hint_ms
        self._strikes += 1
        cap = min(MAX_THROTTLE_MS, int(self.service.stream_idle_timeout * 500))
        pause = int(min(cap, max(50, hint_ms) * 2 ** min(self._strikes - 1, 8)))
        self._hold_until = time.monotonic() + pause / 1e3
        if self._strikes > 1:
            self.service.metrics.streams_throttled.inc()
        return pause

    def _throttle(self) -> None:
        """Wait out this stream's pause (see :meth:`_hold`) before reading its next request."""
        with self._lock:
            while not self._closed and (left := self._hold_until - time.monotonic()) > 0:
                self._lock.wait(left)

    def get(self, timeout: float, idle: str = "header") -> Any:
        """The next request (None at the end, ``WAKE`` when a refusal is waiting); :class:`StreamIdle`
        when none comes within ``timeout`` seconds; the call's own error when it broke."""
        try:
            item = self._q.get(timeout=timeout)
        except queue.Empty:
            what = ("no StreamHeader within" if idle == "header" else "no frame for")
            flag = "" if idle == "header" else " (--stream-idle-timeout)"
            raise StreamIdle(f"{what} {timeout:g} s{flag}: the server closed this idle stream",
                             idle) from None
        self.last_admitted = isinstance(item, tuple) and item[1]
        if item is _END:
            return None
        if isinstance(item, Exception):
            raise item
        return item if item is WAKE else item[0]

    def idle(self) -> bool:
        """Every frame this stream received has been answered (none queued, in a task or refused
        and not yet told)."""
        with self._lock, self._q.mutex:
            queued = any(isinstance(item, tuple) for item in self._q.queue)  # not _END, WAKE, errors
            return self._waiting == 0 and not queued and not self._refused and not self.undelivered

    def refusals(self) -> Iterator[pb.StreamResponse]:
        while self._refused:
            yield pb.StreamResponse(result=self._refused.popleft())

    def done_one(self) -> None:
        with self._lock:
            self._waiting -= 1
            if self.session is not None:
                self.session.queued = self._waiting
            self._lock.notify_all()

    def close(self) -> None:
        """The handler is done: frames admitted but never processed are counted out."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
            while True:
                try:
                    item = self._q.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, tuple) and item[1]:
                    self.service.admission.done(client=self.session.key if self.session else "")
                    self._waiting -= 1
