"""Who may send: stream slots (how many streams at once, in all and per client) and admission control
of frames (how many at once, with a fair share per client and latency feedback). Both refuse at once
with :class:`~palettelink.errors.ResourceExhausted` and a retry hint instead of queueing, so latency
stays bounded however many clients push. Composed by :class:`server.service.Service`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from palettelink.errors import ResourceExhausted
from server.errors import clip
from server.metrics import Metrics


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
