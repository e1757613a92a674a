"""``palettelink-server``: the gRPC server and the HTTP app (dashboard, metrics, probes) in one process.

Both ports are bound first (``0`` picks a free one), then the bundles load while ``/readyz`` says 503
and gRPC health says NOT_SERVING; then one line ``READY grpc=HOST:PORT http=HOST:PORT`` goes to
stdout, which scripts and tests wait for. SIGINT/SIGTERM stop it cleanly: health turns NOT_SERVING,
running calls get a grace period, then the process exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import uvicorn

from palettelink.bundle import default_root
from palettelink.errors import PaletteLinkError
from server import __version__
from server.auth import TokenAuth
from server.grpc_service import GrpcServer, MiB, TLSConfig
from server.http_app import create_app
from server.service import Service

log = logging.getLogger("palettelink.server")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="palettelink-server", description=__doc__.splitlines()[0])
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
    p.add_argument("--tls-client-ca", type=Path, help="CA that client certificates must chain to (mTLS)")
    p.add_argument("--http-tls", action="store_true", help="serve HTTP with the same certificate too")
    p.add_argument("--workers", type=int, default=None,
                   help="gRPC worker threads (default: max streams + 8; each open stream holds one)")
    p.add_argument("--max-streams", type=int, default=64, help="concurrent Stream calls")
    p.add_argument("--max-message-mb", type=float, default=16.0, help="largest gRPC message")
    p.add_argument("--device", default="cpu", help="torch device of the task models (cpu, cuda, cuda:1)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: usable CPUs)")
    p.add_argument("--max-batch", type=int, default=8, help="most frames per task batch")
    p.add_argument("--batch-wait-ms", type=float, default=2.0, help="how long a batch waits to fill")
    p.add_argument("--no-verify", action="store_true", help="skip sha256 checks of bundle files at load")
    p.add_argument("--log-level", default=os.environ.get("PALETTELINK_LOG", "INFO"))
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
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
                 auth: TokenAuth | None = None, tls: TLSConfig | None = None, http_tls: bool = False,
                 max_message_bytes: int = 16 * MiB, workers: int | None = None,
                 log_level: str = "warning") -> None:
        self.service = service
        self.host = host
        auth = auth or TokenAuth({})
        self.auth = auth
        self.tls = tls
        self.grpc = GrpcServer(service, host=host, port=grpc_port, auth=auth, tls=tls,
                               max_message_bytes=max_message_bytes, workers=workers)
        self._sock = _bind(host, http_port)
        self.http_port = int(self._sock.getsockname()[1])
        https = tls if http_tls else None
        self.http_scheme = "https" if https else "http"
        app = create_app(service, auth, max_body_bytes=max_message_bytes)
        config = uvicorn.Config(app, log_level=log_level.lower(), access_log=False, lifespan="off",
                                timeout_graceful_shutdown=3,
                                ssl_certfile=str(https.cert) if https else None,
                                ssl_keyfile=str(https.key) if https else None)
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

    def stop(self, grace: float = 5.0, close_service: bool = True) -> None:
        """NOT_SERVING, finish running calls (up to ``grace`` s), stop HTTP, stop the task workers
        (unless the service is shared with another server: ``close_service=False``)."""
        self.grpc.stop(grace)
        self.http.should_exit = True
        if self._http_thread.is_alive():
            self._http_thread.join(timeout=grace + 5)
        else:
            self._sock.close()
        if close_service:
            self.service.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if bool(args.tls_cert) != bool(args.tls_key):
        print("palettelink-server: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    if (args.tls_client_ca or args.http_tls) and not args.tls_cert:
        print("palettelink-server: --tls-client-ca and --http-tls need --tls-cert/--tls-key", file=sys.stderr)
        return 2
    try:
        auth = TokenAuth.from_sources(args.tokens_file)
    except PaletteLinkError as e:
        print(f"palettelink-server: {e}", file=sys.stderr)
        return 2
    tls = TLSConfig(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    service = Service(args.bundles or default_root(), args.bundle, device=args.device,
                      threads=args.threads, max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
                      max_streams=args.max_streams, verify=not args.no_verify)
    server = PaletteLinkServer(service, host=args.host, grpc_port=args.grpc_port, http_port=args.http_port,
                               auth=auth, tls=tls, http_tls=args.http_tls,
                               max_message_bytes=int(args.max_message_mb * MiB), workers=args.workers,
                               log_level=args.log_level)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("got %s, shutting down", signal.Signals(signum).name)
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
    else:
        flags = [f for f, on in (("tls", tls), ("mtls", tls and tls.client_ca), ("auth", auth.enabled)) if on]
        print(" ".join(["READY", ports, f"bundles={','.join(service.bundles)}", *flags]), flush=True)
        while not stop.wait(0.5):
            pass
    server.stop(grace=5.0)
    log.info("stopped")
    return code


if __name__ == "__main__":
    sys.exit(main())
