"""The edge side of the bidi ``Stream`` RPC: a window of frames in flight, reconnect on UNAVAILABLE.

One :class:`EdgeStream` owns one logical stream. Frames are queued to the current gRPC call; a
reader thread hands responses back. When the call dies with UNAVAILABLE (server restarted, a load
balancer dropped the connection) the stream re-opens with exponential backoff and re-sends every
frame that had no answer yet, so the caller sees each frame answered exactly once, in any order.
Frame ids are the caller's; the server echoes them.

Nothing waits forever: the channel sends keepalive pings (a dead or frozen peer breaks the call
within ~30 s), and each frame has a deadline (``frame_timeout``): a frame unanswered that long is
answered here, as failed (DEADLINE_EXCEEDED, with the reason), and the call is re-opened as after a
lost connection; the failures in a row count against the retry budget like reconnects do. When the
budget is spent, :meth:`EdgeStream.abandon` answers every frame still unanswered as failed, so each
frame sent gets exactly one :class:`Reply`. A frame the server refused under load
(RESOURCE_EXHAUSTED with ``retry_after_ms``) is re-sent after that hint, ``overload_retries`` times at
most, before its refusal is the answer.
"""

from __future__ import annotations

import queue
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from palettelink.v1 import palettelink_pb2 as pb
from palettelink.v1 import palettelink_pb2_grpc as pb_grpc

MAX_MESSAGE_BYTES = 64 << 20
# UNAVAILABLE: server gone or restarting; DEADLINE_EXCEEDED: the server closed an idle stream;
# RESOURCE_EXHAUSTED with a retry-after-ms hint: its stream limits are full for now.
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
KEEPALIVE_MS, KEEPALIVE_TIMEOUT_MS = 20_000, 10_000  # the server accepts pings every 10 s at most
CONNECT_TIMEOUT_S = 3.0  # the default wait for the first connection (--connect-timeout)
PROBE_AFTER_S = 0.3  # not connected by then: probe what listens on the port (see wait_ready)


class ServerUnavailable(Exception):
    """The server could not be reached within the retry budget."""


class StreamFailed(Exception):
    """The server ended the stream with a non-retryable status (bad token, unknown bundle, …)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


@dataclass
class Backoff:
    """Exponential backoff: ``initial``·2^k seconds, capped, at most ``retries`` attempts in a row."""

    retries: int = 5
    initial: float = 0.2
    maximum: float = 5.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt ``attempt`` (1-based)."""
        return min(self.initial * 2 ** (attempt - 1), self.maximum)

    def delays(self) -> Iterator[float]:
        for attempt in range(1, self.retries + 1):
            yield self.delay(attempt)


@dataclass
class Reply:
    """A frame's answer plus what only the edge knows (send time → round-trip latency)."""

    frame_id: int
    result: pb.FrameResult
    latency_ms: float
    meta: Any = None
    answered: bool = True  # False: the server never answered it; failed here, with the reason


@dataclass
class _Pending:
    request: pb.StreamRequest
    meta: Any
    sent: float = field(default_factory=time.perf_counter)
    resend_at: float | None = None  # refused under load: re-sent then (the server's retry hint)
    refusals: int = 0


def make_channel(
    target: str,
    tls_ca: Path | None = None,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    server_name: str | None = None,
) -> grpc.Channel:
    """Insecure channel, TLS when ``tls_ca`` is given, mTLS when a client cert and key are too."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        # Our own reconnect logic decides; don't let the channel wait forever on a dead target.
        ("grpc.enable_retries", 0),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
        # A server that stops answering (frozen, a half-open connection) is noticed by the pings.
        ("grpc.keepalive_time_ms", KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    if tls_ca is None:
        if tls_cert or tls_key:
            raise ValueError("--tls-cert/--tls-key need --tls-ca")
        return grpc.insecure_channel(target, options=options)
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("mTLS needs both --tls-cert and --tls-key")
    creds = grpc.ssl_channel_credentials(
        root_certificates=Path(tls_ca).read_bytes(),
        private_key=Path(tls_key).read_bytes() if tls_key else None,
        certificate_chain=Path(tls_cert).read_bytes() if tls_cert else None,
    )
    return grpc.secure_channel(target, creds, options=options)


def _host_port(target: str) -> tuple[str, int] | None:
    """``host:port`` of a plain or ``dns:`` gRPC target; None for unix sockets and other schemes."""
    t = target
    if t.startswith("dns:"):
        t = t.rsplit("/", 1)[-1]
    elif t.split(":", 1)[0] in ("unix", "unix-abstract", "vsock", "ipv4", "ipv6"):
        return None
    if t.startswith("["):
        host, _, rest = t[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else "443"
    else:
        host, sep, port = t.rpartition(":")
        if not sep:
            host, port = t, "443"
    return (host, int(port)) if host and port.isdigit() else None


def _resolve(host: str, port: int, timeout: float) -> str | None:
    """Why ``host`` does not resolve (None if it does). The lookup runs in a thread so a resolver
    that never answers costs ``timeout`` seconds, not its own retry schedule."""
    result: list[str | None] = []

    def lookup() -> None:
        try:
            socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            result.append(None)
        except (socket.gaierror, UnicodeError) as e:
            result.append(str(getattr(e, "strerror", None) or e))

    t = threading.Thread(target=lookup, name="edge-resolve", daemon=True)
    t.start()
    t.join(timeout)
    return result[0] if result else f"no answer from the resolver within {timeout:g} s"


# HTTP/2's connection preface and an empty SETTINGS frame: a gRPC server answers with its SETTINGS.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def probe(host: str, port: int, timeout: float = 1.0) -> str:
    """What listens on ``host:port``, from one plaintext HTTP/2 preface: ``"h2"`` (a plaintext HTTP/2
    server such as gRPC), ``"http1"`` (an HTTP/1 server: a dashboard or API port), ``"tls"`` (it
    wants a TLS handshake), ``"refused"`` (nothing listens), ``"silent"`` (connected, no answer),
    ``"closed"`` (connected, closed without a word), ``"unreachable"`` (no TCP connection), or
    ``"other"``."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except ConnectionRefusedError:
        return "refused"
    except OSError:
        return "unreachable"
    with sock:
        try:
            sock.settimeout(timeout)
            sock.sendall(_H2_PREFACE)
            data = sock.recv(64)
        except TimeoutError:
            return "tls" if _speaks_tls(host, port, timeout) else "silent"
        except OSError:
            return "tls" if _speaks_tls(host, port, timeout) else "closed"
    if not data:
        return "tls" if _speaks_tls(host, port, timeout) else "closed"
    if data.startswith(b"HTTP/"):
        return "http1"
    if data[0] in (0x15, 0x16) and data[1:2] == b"\x03":  # a TLS alert or handshake record
        return "tls"
    if len(data) >= 9 and data[3] in (0x04, 0x07):  # an HTTP/2 SETTINGS or GOAWAY frame
        return "h2"
    return "other"


def _speaks_tls(host: str, port: int, timeout: float) -> bool:
    """Whether ``host:port`` answers a TLS ClientHello like a TLS server (a gRPC TLS server hangs up
    on plaintext without a word). Nothing is verified: this only tells the protocol."""
    import ssl

    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                ctx.wrap_socket(raw, server_hostname=host) as tls:
            tls.settimeout(timeout)
        return True  # the handshake completed
    except ssl.SSLError as e:  # an alert (certificate required, …) is TLS too; a hang-up is not
        return "EOF" not in str(e) and "WRONG_VERSION" not in str(e) and "record layer" not in str(e)
    except OSError:
        return False


def _wrong_kind(found: str, tls: bool) -> str | None:
    """Why the port can never be the gRPC server as configured (from :func:`probe`), or None."""
    if found == "http1":
        return ("it answers HTTP/1.1, not gRPC: is that the server's HTTP port (dashboard, bundle "
                "downloads)? --server takes its gRPC port (palettelink-server --grpc-port, default 50051)")
    if found == "tls" and not tls:
        return ("it expects TLS: pass --tls-ca FILE (the CA of its certificate; and --tls-cert/"
                "--tls-key if it asks for a client certificate)")
    if found == "h2" and tls:
        return "it speaks plaintext gRPC, not TLS: leave out --tls-ca/--tls-cert/--tls-key"
    return None


def wait_ready(channel: grpc.Channel, target: str, timeout: float, tls: bool = False) -> None:
    """Block until the channel connects, ``timeout`` seconds at most in all (name lookup included);
    then :class:`ServerUnavailable` with what went wrong and the address. gRPC itself re-dials
    meanwhile, so a server that comes up within the window is found. Not connected after
    ``PROBE_AFTER_S``, the port is probed once: a port that can never be this gRPC server (an HTTP/1
    port, TLS against a plaintext channel or the other way round) fails at once, with the fix."""
    deadline = time.monotonic() + timeout
    hp = _host_port(target)
    if hp is not None:
        why = _resolve(*hp, timeout)
        if why is not None:
            raise ServerUnavailable(f"cannot resolve the host of --server {target}: {why}")
    ready = grpc.channel_ready_future(channel)
    try:
        try:
            ready.result(timeout=max(0.0, min(PROBE_AFTER_S, deadline - time.monotonic())))
            return
        except grpc.FutureTimeoutError:
            pass
        if hp is not None and (wrong := _wrong_kind(probe(*hp, min(1.0, timeout)), tls)):
            raise ServerUnavailable(f"cannot reach a PaletteLink server at {target}: {wrong}")
        try:
            ready.result(timeout=max(0.0, deadline - time.monotonic()))
            return
        except grpc.FutureTimeoutError:
            pass
    finally:
        ready.cancel()
    found = probe(*hp, min(1.0, timeout)) if hp is not None else "other"
    wrong = _wrong_kind(found, tls)
    why = {"refused": " (connection refused: nothing listens on that port)",
           "unreachable": " (no TCP connection: a firewall, or the host is down)",
           "silent": " (the port accepts connections but does not answer like gRPC)",
           "closed": " (the port closes connections without answering: not gRPC, or a TLS mismatch)",
           }.get(found, f" ({wrong})" if wrong else "")
    raise ServerUnavailable(
        f"cannot reach a PaletteLink server at {target} within {timeout:g} s{why}; is `palettelink-server` "
        "running there (and TLS set up alike on both ends)? --connect-timeout S waits longer"
    )


def server_decodes_windows(channel: grpc.Channel, bundle_id: str, metadata: Sequence[tuple[str, str]],
                           timeout: float = 5.0) -> bool | None:
    """Whether the server says (``GetInfo``) that it decodes a palette latent of the frame's window for
    the bundle ``bundle_id`` ("name/version"); None where it did not answer. Both read as no: the edge
    then sends whole squares, which every server decodes, and the stream itself reports what is wrong."""
    from palettelink.codecs.palette.window import CODEC as PALETTE  # (imports onnxruntime: once needed)

    name, _, version = bundle_id.partition("/")
    try:
        info = pb_grpc.PaletteLinkStub(channel).GetInfo(pb.GetInfoRequest(), timeout=timeout,
                                                        metadata=tuple(metadata))
    except grpc.RpcError:
        return None
    return any(c.name == PALETTE and c.window_latent
               for b in info.bundles if b.name == name and (not version or b.version == version)
               for c in b.codecs)


def _retry_after_ms(err: grpc.RpcError) -> int:
    """The server's ``retry-after-ms`` trailing metadata (0: none)."""
    try:
        meta = err.trailing_metadata() or ()  # type: ignore[attr-defined]
        return int(next((v for k, v in meta if k == "retry-after-ms"), 0))
    except (AttributeError, TypeError, ValueError):
        return 0


class _Call:
    """One gRPC ``Stream`` call: a request queue feeding it and a reader thread draining it."""

    def __init__(self, stub: pb_grpc.PaletteLinkStub, header: pb.StreamRequest,
                 metadata: Sequence[tuple[str, str]], events: queue.Queue[tuple[int, str, Any]],
                 generation: int) -> None:
        self.requests: queue.Queue[pb.StreamRequest | None] = queue.Queue()
        self.generation = generation
        self._events = events

        def gen() -> Iterator[pb.StreamRequest]:
            yield header
            while (item := self.requests.get()) is not None:
                yield item

        self.call = stub.Stream(gen(), metadata=list(metadata))
        self._thread = threading.Thread(target=self._read, name=f"edge-stream-{generation}", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for resp in self.call:
                self._events.put((self.generation, "result", resp.result))
        except grpc.RpcError as e:
            self._events.put((self.generation, "error", e))
        else:
            self._events.put((self.generation, "end", None))

    def send(self, request: pb.StreamRequest) -> None:
        self.requests.put(request)

    def close_requests(self) -> None:
        self.requests.put(None)

    def cancel(self) -> None:
        self.requests.put(None)
        self.call.cancel()


class EdgeStream:
    """Send frames with at most ``window`` unanswered; yield :class:`Reply` objects as they come."""

    def __init__(self, channel: grpc.Channel, header: pb.StreamHeader,
                 metadata: Sequence[tuple[str, str]] = (), window: int = 2,
                 backoff: Backoff | None = None, frame_timeout: float | None = 30.0,
                 overload_retries: int = 3) -> None:
        if window < 1:
            raise ValueError("window must be ≥ 1")
        if frame_timeout is not None and frame_timeout <= 0:
            raise ValueError("frame_timeout must be > 0 (or None: no deadline)")
        self.frame_timeout = frame_timeout
        self.overload_retries = overload_retries
        self.timeouts = 0
        self.deferred = 0  # frames re-sent after a RESOURCE_EXHAUSTED answer with a retry hint
        self.stub = pb_grpc.PaletteLinkStub(channel)
        self.header = pb.StreamRequest(header=header)
        self.metadata = tuple(metadata)
        self.window = window
        self.backoff = backoff or Backoff()
        self.reconnects = 0
        self._failures = 0
        self._events: queue.Queue[tuple[int, str, Any]] = queue.Queue()
        self._pending: OrderedDict[int, _Pending] = OrderedDict()
        self._generation = 0
        self._call = self._open()

    def _open(self) -> _Call:
        self._generation += 1
        return _Call(self.stub, self.header, self.metadata, self._events, self._generation)

    def send(self, frame: pb.Frame, meta: Any = None) -> Iterator[Reply]:
        """Queue ``frame``; yields the replies that arrive meanwhile (blocking while the window is full)."""
        while len(self._pending) >= self.window:
            yield from self._next_event()
        req = pb.StreamRequest(frame=frame)
        self._pending[frame.frame_id] = _Pending(req, meta)
        self._call.send(req)
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return
            yield from self._handle(event)

    def finish(self) -> Iterator[Reply]:
        """Close the request side and yield the remaining replies."""
        while self._pending:
            yield from self._next_event()
        self._call.close_requests()

    def close(self) -> None:
        self._call.cancel()

    def _next_event(self) -> Iterator[Reply]:
        """Wait for the next event, at most until the oldest unanswered frame's deadline; then that
        frame (and any other past it) is answered as failed and the call re-opened."""
        now = time.perf_counter()
        self._resend_due(now)
        due = [p.resend_at for p in self._pending.values() if p.resend_at is not None]
        if self.frame_timeout is not None:
            due += [p.sent + self.frame_timeout for p in self._pending.values() if p.resend_at is None]
        timeout = max(0.0, min(due) - now) if due else None
        try:
            event = self._events.get(timeout=timeout)
        except queue.Empty:
            self._resend_due(time.perf_counter())
            if self.frame_timeout is not None:
                yield from self._expire()
            return
        yield from self._handle(event)

    def _resend_due(self, now: float) -> None:
        for p in self._pending.values():
            if p.resend_at is not None and p.resend_at <= now:
                p.resend_at, p.sent = None, now
                self._call.send(p.request)

    def _expire(self) -> Iterator[Reply]:
        assert self.frame_timeout is not None
        now = time.perf_counter()
        late = [fid for fid, p in self._pending.items()
                if p.resend_at is None and now - p.sent >= self.frame_timeout]
        why = (f"no answer within {self.frame_timeout:g} s (--frame-timeout): the server is hung, "
               "overloaded or unreachable")
        for fid in late:
            self.timeouts += 1
            yield self._failed(fid, grpc.StatusCode.DEADLINE_EXCEEDED, why)
        if late:
            self._reconnect(why)

    def _failed(self, frame_id: int, code: grpc.StatusCode, message: str) -> Reply:
        """The answer of a frame the server never answered: failed here, with the reason."""
        p = self._pending.pop(frame_id)
        res = pb.FrameResult(frame_id=frame_id, error=pb.FrameError(code=int(code.value[0]), status=code.name,
                                                                    message=message))
        return Reply(frame_id, res, (time.perf_counter() - p.sent) * 1e3, p.meta, answered=False)

    def abandon(self, reason: str, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> Iterator[Reply]:
        """Give up: every frame still unanswered is answered as failed with ``reason``."""
        for fid in list(self._pending):
            yield self._failed(fid, code, f"not answered: {reason}")

    def pending(self, frame_id: int) -> bool:
        return frame_id in self._pending

    def _handle(self, event: tuple[int, str, Any]) -> Iterator[Reply]:
        generation, kind, value = event
        if generation != self._generation:
            return  # a late event from a call we already gave up on
        if kind == "result":
            self._failures = 0
            pending = self._pending.get(value.frame_id)
            if pending is None or pending.resend_at is not None:
                return  # not a frame we are waiting for (already answered, or a stale refusal)
            hint = value.error.retry_after_ms if value.HasField("error") else 0
            if (value.error.status == "RESOURCE_EXHAUSTED" and hint > 0
                    and pending.refusals < self.overload_retries):
                pending.refusals += 1  # the server is overloaded: try again when it says
                pending.resend_at = time.perf_counter() + min(hint / 1e3, self.backoff.maximum)
                self.deferred += 1
                return
            del self._pending[value.frame_id]
            yield Reply(value.frame_id, value, (time.perf_counter() - pending.sent) * 1e3, pending.meta)
            return
        if kind == "end":
            if self._pending:
                raise StreamFailed(grpc.StatusCode.INTERNAL,
                                   f"server closed the stream with {len(self._pending)} frame(s) unanswered")
            return
        err: grpc.RpcError = value
        code = err.code()  # type: ignore[attr-defined]
        hint = _retry_after_ms(err)
        if code not in RETRYABLE and not (code == grpc.StatusCode.RESOURCE_EXHAUSTED and hint):
            raise StreamFailed(code, err.details() or "")  # type: ignore[attr-defined]
        self._reconnect(f"{code.name}: {err.details()}", hint / 1e3 if hint else None)  # type: ignore[attr-defined]

    def _reconnect(self, why: str, delay: float | None = None) -> None:
        """Re-open the call after a backoff (or the server's retry hint) and re-send the unanswered
        frames. The budget counts failures in a row: any answered frame resets it, so a long stream
        survives many blips."""
        self._call.cancel()
        self._failures += 1
        if self._failures > self.backoff.retries:
            raise ServerUnavailable(
                f"lost the server and could not reconnect after {self.backoff.retries} attempts: {why}")
        time.sleep(min(delay, self.backoff.maximum) if delay else self.backoff.delay(self._failures))
        self.reconnects += 1
        self._call = self._open()
        now = time.perf_counter()
        for p in self._pending.values():
            p.sent, p.resend_at = now, None
            self._call.send(p.request)
