"""``palettelink-server``: the gRPC server and the HTTP app (dashboard, metrics, probes) in one process.

Both ports are bound first (``0`` picks a free one), then the bundles load while ``/readyz`` says 503
and gRPC health says NOT_SERVING; then one line ``READY grpc=HOST:PORT http=HOST:PORT`` goes to
stdout, which scripts and tests wait for. SIGINT/SIGTERM stop it cleanly: ``/readyz`` turns 503 and
health NOT_SERVING at once, calls are still taken for ``--drain-delay`` seconds, running calls get
``--drain-grace`` seconds, then the process exits 0. Stream limits, idle timeouts and admission
control: see :class:`server.admission.StreamSlots` and :class:`server.admission.Admission`.

Both doors are secured alike: tokens apply to every HTTP route but the probes (and ``/metrics`` with
``--public-metrics``), ``--http-tls`` serves HTTPS with the gRPC certificate, and with
``--tls-client-ca`` the HTTP port asks for client certificates too. gRPC over TLS with plain HTTP is
refused at start (exit 2) unless ``--http-insecure`` says it is meant (a TLS-terminating proxy).

Bundles are read and verified (manifest and file hashes) before the ports answer: each broken one is
one line on stderr before ``LISTENING``, and with none usable the process exits 2 without listening.

Exit codes: 0 clean stop; 2 bad arguments (insecure flag combinations among them), no usable bundle,
or the ``server`` extra not installed (one line says which pip extra); 3 the gRPC or HTTP port is
taken. The heavy imports (torch, FastAPI, uvicorn) happen in :func:`main` after that check, so an
edge-only install gets the hint, not a traceback, and ``--version`` works everywhere.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from palettelink.bundle import default_root
from palettelink.cliutil import add_version, check_extra, quiet_on_broken_pipe, report_import_error
from palettelink.errors import PaletteLinkError
from server.auth import TokenAuth

if TYPE_CHECKING:
    from server.grpc_service import TLSConfig
    from server.service import Service

log = logging.getLogger("palettelink.server")
PROG = "palettelink-server"
MiB = 1 << 20
EXIT_USAGE, EXIT_PORT_IN_USE = 2, 3


class PortInUse(OSError):
    """The gRPC or HTTP address cannot be bound (the port is taken by another server, usually)."""


def _bind_problem(host: str, port: int) -> str | None:
    """Why a plain bind of ``host:port`` fails now (None: it does not). gRPC only says *that* it
    failed, after logging a core error line; asking first keeps the message to one line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        return _reason(e)
    return None


def _reason(e: OSError) -> str:
    if e.errno == errno.EADDRINUSE:
        return "the port is taken (another palettelink-server?); stop it or pick another port"
    return e.strerror or str(e)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0],
                                epilog="exit codes: 0 stopped cleanly, 2 bad arguments/bundles or missing "
                                       "'server' extra, 3 a port is taken")
    p.add_argument("--bundles", type=Path, default=None,
                   help="bundles root (default $PALETTELINK_BUNDLES or ./bundles)")
    p.add_argument("--bundle", action="append", default=None, metavar="NAME",
                   help="serve only this bundle (name or name/version); repeatable; default: all")
    p.add_argument("--host", default=os.environ.get("PALETTELINK_HOST", "127.0.0.1"),
                   help="address to bind (0.0.0.0 in containers; default 127.0.0.1 or $PALETTELINK_HOST)")
    p.add_argument("--grpc-port", type=int, default=50051, help="0 picks a free port")
    p.add_argument("--http-port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--tokens-file", type=Path, default=None,
                   help="per-client bearer tokens, '<client> <token>' a line (also $PALETTELINK_TOKENS)")
    p.add_argument("--tls-cert", type=Path, help="server certificate (PEM) for gRPC TLS")
    p.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    p.add_argument("--tls-client-ca", type=Path,
                   help="CA that client certificates must chain to (mTLS; on HTTP too with --http-tls)")
    p.add_argument("--http-tls", action="store_true",
                   help="serve HTTPS with the same certificate (and client-certificate check); required "
                        "with --tls-cert unless --http-insecure")
    p.add_argument("--http-insecure", action="store_true",
                   help="serve plain HTTP although gRPC uses TLS (only behind a proxy that terminates TLS "
                        "for the HTTP port; logs a warning)")
    p.add_argument("--public-metrics", action="store_true",
                   help="serve /metrics without a token when tokens are configured (default: it needs "
                        "one, like every route but /healthz and /readyz)")
    p.add_argument("--workers", type=int, default=None,
                   help="gRPC worker threads (default: --max-streams + 16; each open stream holds one; "
                        "at least --max-streams + 4, so unary calls and health checks always find one)")
    p.add_argument("--max-streams", type=int, default=64,
                   help="concurrent Stream calls in all, header-less ones included (default 64)")
    p.add_argument("--max-streams-per-client", type=int, default=16, metavar="N",
                   help="concurrent Stream calls of one client: the token's client name, else the header's "
                        "client_id, else the peer address (default 16)")
    p.add_argument("--stream-idle-timeout", type=float, default=60.0, metavar="S",
                   help="close a stream that sends no frame for S seconds (DEADLINE_EXCEEDED; default 60)")
    p.add_argument("--header-timeout", type=float, default=5.0, metavar="S",
                   help="close a stream that sends no StreamHeader within S seconds (default 5)")
    p.add_argument("--max-pending-frames", type=int, default=32, metavar="N",
                   help="frames admitted in all (waiting for or in decode + task); more are refused with "
                        "RESOURCE_EXHAUSTED and a retry hint instead of queueing (default 32)")
    p.add_argument("--shed-latency-ms", type=float, default=2000.0, metavar="MS",
                   help="while recent frames took longer than MS, admit only --max-batch frames at a time "
                        "and refuse the rest (RESOURCE_EXHAUSTED + retry hint); 0: off (default 2000)")
    p.add_argument("--max-stream-queue", type=int, default=4, metavar="N",
                   help="frames waiting in one stream; beyond, the stream is not read further and flow "
                        "control holds its sender (default 4)")
    p.add_argument("--drain-delay", type=float, default=1.0, metavar="S",
                   help="on SIGTERM: /readyz 503 and health NOT_SERVING at once, new calls still taken for "
                        "S seconds so load balancers see it first (default 1)")
    p.add_argument("--drain-grace", type=float, default=5.0, metavar="S",
                   help="then running calls get S seconds to finish before they are cancelled (default 5)")
    p.add_argument("--max-message-mb", type=float, default=16.0, help="largest gRPC message")
    p.add_argument("--preview-frames", type=int, default=None, metavar="N",
                   help="rebuilt pictures kept for the dashboard (image bundles, only those asked for; "
                        "default 32; 0 keeps none)")
    p.add_argument("--preview-mb", type=float, default=None, metavar="MB",
                   help="and at most this many MB of them (default 16)")
    p.add_argument("--max-try-uploads", type=int, default=2, metavar="N",
                   help="dashboard Try-it uploads decoded and coded at once; more are refused at once with "
                        "a retry hint (default 2)")
    p.add_argument("--try-max-pixels", type=int, default=1 << 24, metavar="N",
                   help="pixel budget of one Try-it upload, checked from the image header before decoding "
                        "(413 beyond; default 16777216 = 4096²)")
    p.add_argument("--device", default="cpu", help="torch device of the task models (cpu, cuda, cuda:1)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: usable CPUs)")
    p.add_argument("--max-batch", type=int, default=None,
                   help="most frames per task batch (default: 1 for a task in onnxruntime on the CPU, "
                        "where a batch costs what its frames cost one by one; else 8)")
    p.add_argument("--batch-wait-ms", type=float, default=2.0, help="how long a batch waits to fill")
    p.add_argument("--no-verify", action="store_true", help="skip sha256 checks of bundle files at load")
    p.add_argument("--bench-json", type=Path, default=None, metavar="FILE",
                   help="bench results drawn on the dashboard's Rate–accuracy page (default: the "
                        "repository's docs/results/bench-eval.json)")
    p.add_argument("--log-level", default=os.environ.get("PALETTELINK_LOG", "INFO"))
    add_version(p)
    return p


def _preview_limits(args: argparse.Namespace) -> dict[str, int]:
    """The preview-store bounds the operator set (the Service's defaults otherwise)."""
    out = {}
    if args.preview_frames is not None:
        out["preview_frames"] = int(args.preview_frames)
    if args.preview_mb is not None:
        out["preview_bytes"] = int(args.preview_mb * MiB)
    return out


def _check_limits(args: argparse.Namespace) -> str | None:
    """Why the limit flags do not fit together (None: they do)."""
    for flag in ("max_streams", "max_streams_per_client", "max_pending_frames", "max_stream_queue",
                 "max_try_uploads", "try_max_pixels"):
        if getattr(args, flag) < 1:
            return f"--{flag.replace('_', '-')} must be ≥ 1"
    if min(args.stream_idle_timeout, args.header_timeout) <= 0 or min(args.drain_grace, args.drain_delay) < 0:
        return "--stream-idle-timeout and --header-timeout must be > 0, --drain-grace and --drain-delay ≥ 0"
    if min(args.preview_frames or 0, args.preview_mb or 0) < 0:
        return "--preview-frames and --preview-mb must be ≥ 0"
    if args.workers is not None and args.workers < args.max_streams + 4:
        return (f"--workers {args.workers} must be at least --max-streams + 4 = {args.max_streams + 4}, "
                "so that unary calls and health checks always find a free worker")
    return None


def _check_security(args: argparse.Namespace) -> str | None:
    """Why the TLS flags would leave the HTTP port less protected than gRPC (None: they do not)."""
    if args.http_tls and args.http_insecure:
        return "--http-tls and --http-insecure contradict each other: pick one"
    if args.tls_cert and not args.http_tls and not args.http_insecure:
        mtls = " and its client-certificate check (--tls-client-ca)" if args.tls_client_ca else ""
        return (f"gRPC uses TLS (--tls-cert){mtls} but HTTP would be plain, tokens and dashboard in clear: "
                "add --http-tls to serve HTTPS with the same certificate, or --http-insecure if a proxy "
                "terminates TLS for the HTTP port")
    return None


def _bind(host: str, port: int) -> socket.socket:
    """The HTTP listening socket, bound here so a taken port is a :class:`PortInUse`, not a uvicorn
    traceback. SO_REUSEADDR (restart over TIME_WAIT) but never SO_REUSEPORT (a second server)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise PortInUse(e.errno, f"cannot bind HTTP to {_fmt(host, port)} (--http-port): {_reason(e)}") from e
    sock.set_inheritable(True)
    return sock


def _fmt(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class PaletteLinkServer:
    """gRPC server + HTTP app over one :class:`Service`, started and stopped together.

    Used by :func:`main` and by tests (which run it in-process on free ports). Ports are bound in
    the constructor, so :attr:`grpc_address` and :attr:`http_url` are known before :meth:`start`.
    """

    def __init__(self, service: Service, *, host: str = "127.0.0.1", grpc_port: int = 0, http_port: int = 0,
                 auth: TokenAuth | None = None, tls: TLSConfig | None = None, http_tls: bool | None = None,
                 max_message_bytes: int = 16 * MiB, workers: int | None = None,
                 log_level: str = "warning", bench_json: Path | None = None,
                 public_metrics: bool = False, try_uploads: int | None = None,
                 try_max_pixels: int | None = None) -> None:
        """``http_tls``: serve HTTPS with ``tls`` (its ``client_ca`` included: client certificates are
        then required on HTTP as on gRPC); ``None``, the default, follows ``tls``, so an embedded server
        is never less secure on HTTP than on gRPC unless ``http_tls=False`` says so."""
        import ssl

        import uvicorn

        from server.grpc_service import GrpcServer
        from server.http_app import create_app

        self.service = service
        self.host = host
        auth = auth or TokenAuth({})
        self.auth = auth
        self.tls = tls
        grpc_where = f"cannot bind gRPC to {_fmt(host, grpc_port)} (--grpc-port)"
        if grpc_port and (why := _bind_problem(host, grpc_port)):
            raise PortInUse(errno.EADDRINUSE, f"{grpc_where}: {why}")
        try:
            self.grpc = GrpcServer(service, host=host, port=grpc_port, auth=auth, tls=tls,
                                   max_message_bytes=max_message_bytes, workers=workers)
        except (OSError, RuntimeError) as e:  # add_*_port found the address taken (SO_REUSEPORT is off)
            if "bind" not in str(e):
                raise
            why = _bind_problem(host, grpc_port) or "refused by gRPC"
            raise PortInUse(errno.EADDRINUSE, f"{grpc_where}: {why}") from e
        try:
            self._sock = _bind(host, http_port)
        except PortInUse:
            self.grpc.stop(0)
            raise
        self.http_port = int(self._sock.getsockname()[1])
        https = tls if (http_tls is None or http_tls) else None
        if tls is not None and https is None:
            log.warning("HTTP is plain while gRPC uses TLS: tokens and dashboard data cross the HTTP port "
                        "in clear (--http-insecure); a proxy must terminate TLS for it")
        elif auth.enabled and tls is None:
            log.warning("tokens are configured but TLS is off: they cross both ports in clear; use "
                        "--tls-cert/--tls-key with --http-tls outside a trusted network")
        self.http_scheme = "https" if https else "http"
        self.http_mtls = bool(https and https.client_ca)
        try_limits = {k: v for k, v in (("try_uploads", try_uploads), ("try_max_pixels", try_max_pixels))
                      if v is not None}
        app = create_app(service, auth, max_body_bytes=max_message_bytes, bench_json=bench_json,
                         public_metrics=public_metrics, **try_limits)
        config = uvicorn.Config(app, log_level=log_level.lower(), access_log=False, lifespan="off",
                                timeout_graceful_shutdown=3,
                                ssl_certfile=str(https.cert) if https else None,
                                ssl_keyfile=str(https.key) if https else None,
                                ssl_ca_certs=str(https.client_ca) if self.http_mtls else None,  # type: ignore[union-attr]
                                ssl_cert_reqs=ssl.CERT_REQUIRED if self.http_mtls else ssl.CERT_NONE)
        self.http = uvicorn.Server(config)
        self._http_thread = threading.Thread(target=self.http.run, kwargs={"sockets": [self._sock]},
                                             name="http", daemon=True)

    @property
    def grpc_address(self) -> str:
        return self.grpc.address

    @property
    def http_address(self) -> str:
        return _fmt(self.host, self.http_port)

    @property
    def http_url(self) -> str:
        return f"{self.http_scheme}://{self.http_address}"

    def start(self, timeout: float = 10.0) -> None:
        """Start both transports (bundles may still be loading: probes say so)."""
        self.grpc.start()
        self._http_thread.start()
        deadline = time.monotonic() + timeout
        while not self.http.started and self._http_thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self.http.started:
            raise RuntimeError("HTTP server did not start")

    def load(self) -> None:
        """Load the service's bundles, then report SERVING."""
        if not self.service.ready:
            self.service.load()
        self.grpc.set_serving(True)

    def drain(self) -> None:
        """The first step of a shutdown: ``/readyz`` answers 503 and gRPC health NOT_SERVING from
        now on, while both ports still answer (so probes see it before connections are refused)."""
        self.service.drain()
        self.grpc.set_serving(False)

    def stop(self, grace: float = 5.0, close_service: bool = True) -> None:
        """Drain (readiness false), finish running calls (up to ``grace`` s), stop HTTP, stop the task
        workers (unless the service is shared with another server: ``close_service=False``)."""
        if close_service:
            self.drain()
        else:
            self.grpc.set_serving(False)
        self.grpc.stop(grace)
        self.http.should_exit = True
        if self._http_thread.is_alive():
            self._http_thread.join(timeout=grace + 5)
        else:
            self._sock.close()
        if close_service:
            self.service.close()


def main(argv: list[str] | None = None) -> int:
    return quiet_on_broken_pipe(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if (code := check_extra(PROG, "server")) is not None:
        return code
    try:
        from server.grpc_service import TLSConfig
        from server.service import Service

        import_runtime()
    except ImportError as e:  # present but broken (or shadowed) dependency
        return report_import_error(PROG, "server", e)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if bool(args.tls_cert) != bool(args.tls_key):
        print("palettelink-server: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    if (args.tls_client_ca or args.http_tls) and not args.tls_cert:
        print("palettelink-server: --tls-client-ca and --http-tls need --tls-cert/--tls-key", file=sys.stderr)
        return 2
    if (why := _check_security(args)) is not None:
        print(f"palettelink-server: {why}", file=sys.stderr)
        return 2
    try:
        auth = TokenAuth.from_sources(args.tokens_file)
    except PaletteLinkError as e:
        print(f"palettelink-server: {e}", file=sys.stderr)
        return 2
    tls = TLSConfig(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    if (why := _check_limits(args)) is not None:
        print(f"palettelink-server: {why}", file=sys.stderr)
        return 2
    service = Service(args.bundles or default_root(), args.bundle, device=args.device,
                      threads=args.threads, max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
                      max_streams=args.max_streams, max_streams_per_client=args.max_streams_per_client,
                      max_pending=args.max_pending_frames, max_stream_queue=args.max_stream_queue,
                      shed_latency_ms=args.shed_latency_ms,
                      stream_idle_timeout=args.stream_idle_timeout, header_timeout=args.header_timeout,
                      verify=not args.no_verify, **_preview_limits(args))
    try:
        server = PaletteLinkServer(service, host=args.host, grpc_port=args.grpc_port,
                                   http_port=args.http_port, auth=auth, tls=tls, http_tls=args.http_tls,
                                   max_message_bytes=int(args.max_message_mb * MiB), workers=args.workers,
                                   log_level=args.log_level, bench_json=args.bench_json,
                                   public_metrics=args.public_metrics, try_uploads=args.max_try_uploads,
                                   try_max_pixels=args.try_max_pixels)
    except PortInUse as e:
        service.close()
        print(f"{PROG}: {e.strerror}", file=sys.stderr)
        return EXIT_PORT_IN_USE
    # Bundles are read and verified before the ports answer, so their errors come first, one line each,
    # and a server with none usable exits 2 without ever listening; building the task models (slow)
    # happens after LISTENING, while the probes say "not ready".
    try:
        service.discover(log_errors=False)
    except PaletteLinkError as e:
        server.stop(grace=0)
        print(f"{PROG}: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    for label, why in service.load_errors.items():
        why = why.removeprefix(f"bundle {label}: ")
        print(f"{PROG}: bundle {label} not loaded: {why}", file=sys.stderr, flush=True)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("got %s, shutting down", signal.Signals(signum).name)
        server.drain()  # readiness false first: /readyz 503, health NOT_SERVING, then the drain
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    server.start()
    ports = f"grpc={server.grpc_address} http={server.http_address}"
    print(f"LISTENING {ports}", flush=True)
    code = 0
    try:
        server.load()
    except PaletteLinkError as e:
        print(f"palettelink-server: {e}", file=sys.stderr)
        code = 2
    except ImportError as e:  # a task model's dependency (torch, ultralytics) that does not import
        code = report_import_error(PROG, "server", e)
    else:
        flags = [f for f, on in (("tls", tls), ("mtls", tls and tls.client_ca), ("auth", auth.enabled),
                                 ("https", server.http_scheme == "https"), ("http-mtls", server.http_mtls))
                 if on]
        print(" ".join(["READY", ports, f"bundles={','.join(service.bundles)}", *flags]), flush=True)
        while not stop.wait(0.5):
            pass
        time.sleep(args.drain_delay)  # readiness is already false (on_signal): let probes notice
    server.stop(grace=args.drain_grace)
    log.info("stopped")
    return code


def import_runtime() -> None:
    """Import what the server runs on now, so a broken dependency fails before any port is bound."""
    import fastapi  # noqa: F401
    import prometheus_client  # noqa: F401
    import uvicorn  # noqa: F401

    import server.http_app  # noqa: F401


if __name__ == "__main__":
    sys.exit(main())
