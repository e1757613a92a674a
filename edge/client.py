"""``palettelink-edge``: capture → ONNX front → codec → gRPC stream → print the server's results.

Every input frame gets exactly one record (a text line, or a JSON object with ``--json``) in every
outcome: ``ok``; answered with an error (``failed``, or ``refused`` under load once its retries are
spent); ``not_answered`` (sent, and the server never answered); ``not_sent`` (the stream was lost
before its turn: with ``--json`` every input not read yet gets one too); ``not_read`` (an input that
could not be read or coded: named, the others still streamed). The stderr summary counts the same
records (``edge/records.py``).

Exit codes: 0 every frame answered without error; 1 some frames failed (answered with an error, or
unanswered because the server broke the stream: INTERNAL, UNKNOWN, …); 2 bad arguments, bundle or
inputs (an unreadable, truncated or oversized input exits 2 after the others were streamed); 3 server
unreachable (not resolvable, not answering within ``--connect-timeout``, not a PaletteLink gRPC port,
or lost or frozen for good mid-stream); 4 the server refused the stream (token, permission, unknown
bundle, …); 130 interrupted; 141 stdout closed early (``| head``). This module and everything it
imports stay free of torch (tested).

Bundles: the edge loads only the edge part of a bundle (``side="edge"``: front, codec graphs and
tables), from ``--bundles``, else from the fetch cache; ``--fetch-bundle NAME[/VERSION]`` (or
``--bundle NAME`` with ``--http URL`` when no copy is found) downloads it from the server's HTTP side
into the cache first (:mod:`palettelink.fetch`). The HTTP address is ``--http URL``, by default the
``--server`` host on port 8000 (https with ``--tls-ca``).
"""

from __future__ import annotations

import argparse
import itertools
import os
import socket
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import NoReturn, TextIO

import grpc

from edge.records import (
    NOT_READ,
    NOT_SENT,
    OK,
    OUTCOMES,
    FrameMeta,
    edge_reply,
    print_record,
    reply_record,
    save_preview,
    status_code,
)
from edge.transport import (
    CONNECT_TIMEOUT_S,
    Backoff,
    EdgeStream,
    Reply,
    ServerUnavailable,
    StreamFailed,
    make_channel,
    server_decodes_windows,
    wait_ready,
)
from palettelink import capture
from palettelink.bundle import Bundle, find_bundle
from palettelink.cliutil import ArgumentParser, add_version, exit_without_teardown, quiet_on_broken_pipe
from palettelink.codecs import EdgeEncoder, default_codec, make_encoder, spec
from palettelink.errors import BundleNotFound, InvalidRequest, PaletteLinkError, Unauthenticated
from palettelink.fetch import Client, FetchError, default_cache, default_http_url, fetch_bundle
from palettelink.ratecontrol import LevelCoder, all_levels, controller_from
from palettelink.v1 import palettelink_pb2 as pb

EXIT_OK, EXIT_FRAME_ERRORS, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_REFUSED = 0, 1, 2, 3, 4
PROG = "palettelink-edge"
# Stream statuses that mean "the server will not take this stream" (exit 4); any other non-retryable
# status ends the stream as a server failure (INTERNAL, UNKNOWN, DATA_LOSS, …: exit 1).
REFUSALS = frozenset({
    grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.ALREADY_EXISTS,
})
# Channels of finished streams that main() leaves open until the process exits (see run()).
_HELD: list[grpc.Channel] = []


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=PROG,
        description="Stream images, folders or videos to a PaletteLink server as coded features.",
        epilog="exit codes: 0 ok, 1 some frames failed, 2 bad arguments/input/bundle, 3 server "
               "unreachable or lost, 4 server refused the stream",
    )
    p.add_argument("paths", nargs="*", metavar="PATH",
                   help="image files, folders (recursive) or video files; camera:N for a camera; "
                        "samples: for the sample images that ship with the client")
    p.add_argument("--server", required=True, metavar="HOST:PORT", help="gRPC address of the server")
    p.add_argument("--bundle", default=None, help="bundle name, name/version, or a bundle folder")
    p.add_argument("--bundles", type=Path, default=None, metavar="DIR",
                   help="bundle root (default: $PALETTELINK_BUNDLES or ./bundles; then the fetch cache)")
    p.add_argument("--fetch-bundle", default=None, metavar="NAME[/VERSION]",
                   help="download the bundle's edge part from the server into the cache (verified, "
                        "atomic), then stream PATHs with it, if any")
    p.add_argument("--http", default=None, metavar="URL",
                   help="the server's HTTP address for bundle downloads (default: http://HOST:8000 of "
                        "--server, https with --tls-ca); with it, a --bundle found nowhere is fetched")
    p.add_argument("--cache", type=Path, default=None, metavar="DIR",
                   help="fetched bundles (default: $XDG_CACHE_HOME/palettelink/bundles or "
                        "~/.cache/palettelink/bundles)")
    p.add_argument("--precision", choices=("auto", "fp32", "int8"), default="auto",
                   help="edge graph precision: auto (default: the bundle's int8 graph where its measured "
                        "agreement with fp32 is ≥ 0.97, see `palettelink int8`), fp32 or int8")
    p.add_argument("--canvas", choices=("auto", "square", "window"), default="auto",
                   help="palette codec: code the frame's window of the letterbox (its rows and columns, "
                        "stride-aligned: a quarter less work and bits for 4:3 frames) or the whole square; "
                        "auto (default): the window where the bundle can and the server says it decodes it")
    p.add_argument("--codec", default=None,
                   help="a codec the bundle offers, e.g. palette, baseline, avif (`palettelink info` lists "
                        "them and their levels; default: the bundle's best)")
    rate = p.add_mutually_exclusive_group()
    rate.add_argument("--bits", type=int, default=None, help="baseline: bits per value (2..8)")
    rate.add_argument("--level", type=int, default=None,
                      help="codec level (palette: diffusion step; avif: 0 = q75 … 9 = q0 at 1/4 size)")
    rate.add_argument("--target-bpp", type=float, default=None, metavar="BPP",
                      help="per frame, the finest level within BPP bits per pixel")
    rate.add_argument("--target-bytes", type=int, default=None, metavar="N",
                      help="per frame, the finest level within N bytes")
    rate.add_argument("--kbps", type=float, default=None, help="stream budget in kbit/s (with --fps)")
    p.add_argument("--fps", type=float, default=None, help="frame rate the --kbps budget is spread over")
    p.add_argument("--every", type=int, default=1, metavar="N", help="keep every N-th video frame")
    p.add_argument("--max-frames", type=int, default=None, metavar="N", help="stop after N frames in all")
    p.add_argument("--task", default=None,
                   help="task the server runs on the stream (default: the bundle's own; an image bundle "
                        "offers detect, segment, landmarks, pose and preview)")
    p.add_argument("--preview", type=Path, default=None, metavar="DIR",
                   help="ask for the server's rebuilt picture of each frame and save it as DIR/<frame>.jpg")
    p.add_argument("--json", action="store_true", help="one JSON object per frame on stdout")
    p.add_argument("--token", default=os.environ.get("PALETTELINK_TOKEN"),
                   help="client token sent as 'authorization: Bearer T' (default: $PALETTELINK_TOKEN)")
    p.add_argument("--tls-ca", type=Path, default=None, metavar="FILE", help="CA certificate: use TLS")
    p.add_argument("--tls-cert", type=Path, default=None, metavar="FILE", help="client certificate (mTLS)")
    p.add_argument("--tls-key", type=Path, default=None, metavar="FILE", help="client key (mTLS)")
    p.add_argument("--tls-server-name", default=None, help="expected server name in its certificate")
    p.add_argument("--client-id", default=f"{socket.gethostname()}-{os.getpid()}")
    p.add_argument("--window", type=int, default=2, help="frames in flight (default 2)")
    p.add_argument("--retries", type=int, default=8,
                   help="reconnect attempts in a row once streaming (default 8)")
    p.add_argument("--connect-timeout", type=float, default=CONNECT_TIMEOUT_S, metavar="S",
                   help=f"seconds to wait for the first connection, DNS included (default "
                        f"{CONNECT_TIMEOUT_S:g}); then exit 3")
    p.add_argument("--frame-timeout", type=float, default=30.0, metavar="S",
                   help="a frame unanswered for S seconds is reported failed (DEADLINE_EXCEEDED) and the "
                        "stream re-opened; counts against --retries like a lost connection (default 30)")
    add_version(p)
    return p


def _fail(code: int, msg: str) -> int:
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    return code


def _choose_canvas(encoder: EdgeEncoder, canvas: str, channel: grpc.Channel, bundle_id: str,
                   metadata: list[tuple[str, str]]) -> None:
    """Window or whole square (``--canvas``) for an encoder that can code windows (the palette codec
    of a bundle built with them); ``auto`` asks the server first, since one built before windows
    refuses them."""
    if not getattr(encoder, "window_capable", False):
        if canvas == "window":
            print(f"{PROG}: warning: this bundle's codec codes whole squares only (--canvas window "
                  "ignored; rebuild it with `palettelink build-bundle`)", file=sys.stderr)
        return
    from palettelink.codecs.palette.window import use_window  # only a palette encoder gets here
    said = server_decodes_windows(channel, bundle_id, metadata) if canvas == "auto" else None
    use_window(encoder, canvas == "window" or bool(said))
    if said is False:  # it answered, and not yes: an older server (or a bundle it does not serve)
        print(f"{PROG}: note: the server does not say it decodes the frame's window for {bundle_id}; "
              "coding whole letterboxed squares (upgrade the server for about 15 % fewer bytes)",
              file=sys.stderr)


def _level_for(args: argparse.Namespace, codec: str, encoder: EdgeEncoder) -> int | None:
    """The fixed level asked for, checked against what the codec offers, in the words of the flag
    given (``--bits`` are bits per value, ``--level`` a codec level)."""
    param = spec(codec).param
    if args.bits is not None and param != "bits":
        raise InvalidRequest(f"--bits is for a codec whose levels are bit depths (baseline); "
                             f"use --level with {codec}")
    level = args.bits if args.bits is not None else args.level
    offered = sorted(all_levels(encoder))
    if level is not None and level not in offered:
        if args.bits is not None:
            raise InvalidRequest(f"--bits {level}: the {codec} codec codes {offered[0]} to {offered[-1]} "
                                 f"bits per value {offered}")
        raise InvalidRequest(f"--level {level} is not offered by the {codec} codec; its levels are {offered}"
                             + (" (bits per value: --bits works too)" if param == "bits" else ""))
    return level


def _http_client(args: argparse.Namespace) -> Client:
    url = args.http or default_http_url(args.server, tls=args.tls_ca is not None)
    return Client(url, token=args.token, ca=args.tls_ca)


def _log(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


def _bundle(args: argparse.Namespace) -> Bundle:
    """The edge part of the bundle to stream with: fetched (``--fetch-bundle``), else found under
    ``--bundles``, else in the cache, else fetched when ``--http`` names where from."""
    cache = args.cache or default_cache()
    if args.fetch_bundle:
        return fetch_bundle(args.fetch_bundle, _http_client(args), cache, log=_log)
    try:
        return find_bundle(args.bundle, args.bundles, side="edge")
    except BundleNotFound as first:
        if Path(args.bundle).is_dir():
            raise
        try:
            return find_bundle(args.bundle, cache, side="edge")
        except BundleNotFound:
            if not args.http:
                raise BundleNotFound(f"{first} (nor in the fetch cache {cache})") from None
    return fetch_bundle(args.bundle, _http_client(args), cache, log=_log)


def _check_limits(args: argparse.Namespace) -> None:
    if args.window < 1:
        raise InvalidRequest(f"--window must be ≥ 1, got {args.window}")
    if args.retries < 0 or args.connect_timeout <= 0 or args.frame_timeout <= 0:
        raise InvalidRequest("--retries must be ≥ 0, --connect-timeout and --frame-timeout > 0")


def run(args: argparse.Namespace, out: TextIO = sys.stdout, close_channel: bool = True) -> int:
    """Stream ``args.paths``; every input frame gets exactly one record (stdout) whatever happens:
    answered (``ok``, ``failed``, ``refused``), ``not_answered`` (the server never answered it),
    ``not_sent`` (the stream was lost before its turn; listed one by one with ``--json``) or
    ``not_read`` (the input could not be read or coded). The stderr summary counts the same records.

    ``close_channel=False`` leaves the gRPC channel open (held until the process ends) for a caller
    that exits without teardown (:func:`main`); the stream itself is cancelled either way."""
    tally: Counter[str] = Counter()
    unreadable: list[str] = []
    ids = itertools.count()  # one frame id per record, sent or not
    names: Sequence[str] = ()
    previews: set[str] = set()

    def emit(reply: Reply) -> None:
        rec = reply_record(reply, names)
        if args.preview is not None and reply.result.preview_jpeg:
            save_preview(args.preview, reply.meta.label, reply.result.preview_jpeg, previews)
        print_record(rec, reply.meta.label, out, args.json)
        tally[rec["outcome"]] += 1

    def emit_all(replies: Iterator[Reply]) -> None:
        for reply in replies:
            emit(reply)

    def not_read(src: capture.Source, err: PaletteLinkError) -> None:  # one bad input never stops the others
        unreadable.append(str(err) if src.name in str(err) else f"{src.name}: {err}")
        meta = FrameMeta(src.name, src.name, 0, 0, -1, (0, 0), {}, outcome=NOT_READ)
        emit(edge_reply(next(ids), meta, status_code(err.code), f"not read: {err}"))

    try:
        _check_limits(args)
        if not args.bundle and not args.fetch_bundle:
            raise InvalidRequest("give --bundle NAME (or --fetch-bundle NAME to download it)")
        if not args.paths and not args.fetch_bundle:
            raise InvalidRequest("give at least one PATH to stream")
        if args.paths:
            sources = capture.expand(args.paths)
            frames = capture.iter_frames(sources, args.every, args.max_frames, on_error=not_read)
        if args.preview is not None:
            args.preview.mkdir(parents=True, exist_ok=True)
        bundle = _bundle(args)
        if not args.paths:
            print(f"{bundle.id} {bundle.path}", file=out)
            return EXIT_OK
        codec = args.codec or default_codec(bundle)
        from palettelink.front import set_session_defaults  # (onnxruntime: imported once needed)

        # threads from the usable CPUs (affinity, cgroup quota); idle ONNX threads must not fight the
        # box's other work; the int8 graph where the bundle measured it agreeing with fp32
        set_session_defaults(spinning=False, precision=args.precision)
        encoder: EdgeEncoder = make_encoder(bundle, codec)
        level = _level_for(args, codec, encoder)
        coder = LevelCoder(encoder, controller_from(level, args.target_bpp, args.target_bytes, args.kbps,
                                                    args.fps))
        if coder.fixed_warning:  # said once, not per frame
            print(f"{PROG}: warning: {coder.fixed_warning}", file=sys.stderr)
        channel = make_channel(args.server, args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
    except FetchError as e:
        return _fail(EXIT_UNREACHABLE, str(e))
    except Unauthenticated as e:
        return _fail(EXIT_REFUSED, str(e))
    except BundleNotFound as e:
        if args.fetch_bundle or args.http:
            return _fail(EXIT_USAGE, str(e))
        hint = f" (to build it there: palettelink build-bundle --out {args.bundles})" if args.bundles else ""
        return _fail(EXIT_USAGE, f"{e}{hint}; or fetch it from the server: --fetch-bundle NAME")
    except (PaletteLinkError, ValueError, OSError) as e:
        return _fail(EXIT_USAGE, str(e))

    metadata = [("authorization", f"Bearer {args.token}")] if args.token else []
    names = bundle.class_names
    stream: EdgeStream | None = None
    in_hand: tuple[int, FrameMeta] | None = None  # the frame being handed to the stream
    failure: tuple[int, str] | None = None  # (exit code, message) when the stream was lost for good

    def give_up(code: grpc.StatusCode, reason: str) -> None:
        """The stream is lost for good: every frame sent and unanswered, the one in hand and (with
        --json) every input not read yet gets its one record, failed with ``reason``."""
        # whether the frame in hand reached the stream decides which record it gets: not answered
        # (abandoned below) or not sent; asked before abandon() empties the stream's pending set
        unsent = in_hand is not None and (stream is None or not stream.pending(in_hand[0]))
        if stream is not None:
            emit_all(stream.abandon(reason, code))
        if unsent:
            assert in_hand is not None
            emit(edge_reply(in_hand[0], replace(in_hand[1], outcome=NOT_SENT), code, f"not sent: {reason}"))
        if not args.json:
            return
        for cap in frames:
            if cap.kind == "camera":
                break  # a camera never ends: its frames were not taken, so they have no records
            h, w = cap.rgb.shape[:2]
            meta = FrameMeta(cap.label, cap.source, cap.index, 0, -1, (w, h), {}, outcome=NOT_SENT)
            emit(edge_reply(next(ids), meta, code, f"not sent: {reason}"))

    try:
        try:
            wait_ready(channel, args.server, args.connect_timeout, tls=args.tls_ca is not None)
            _choose_canvas(encoder, args.canvas, channel, bundle.id, metadata)
            header = pb.StreamHeader(client_id=args.client_id, bundle=bundle.id,
                                     task=args.task or bundle.task, want_preview=args.preview is not None)
            stream = EdgeStream(channel, header, metadata, window=args.window,
                                backoff=Backoff(retries=args.retries), frame_timeout=args.frame_timeout)
            for cap in frames:
                frame_id = next(ids)
                try:
                    coded = coder.encode(cap.rgb)
                except PaletteLinkError as e:  # this frame cannot be coded; the others go on
                    unreadable.append(f"{cap.label}: {e}")
                    h, w = cap.rgb.shape[:2]
                    meta = FrameMeta(cap.label, cap.source, cap.index, 0, -1, (w, h), {}, outcome=NOT_READ)
                    emit(edge_reply(frame_id, meta, status_code(e.code), f"not coded: {e}"))
                    continue
                enc = coded.encoded
                if coded.choice is not None and coded.choice.warning:
                    print(f"{PROG}: {cap.label}: {coded.choice.warning}", file=sys.stderr)
                meta = FrameMeta(cap.label, cap.source, cap.index, len(enc.payload), enc.level,
                                 enc.image_size, enc.timings_ms, novelty=enc.novelty, fallback=enc.fallback)
                if enc.fallback:
                    print(f"{PROG}: {cap.label}: {enc.fallback}", file=sys.stderr)
                req = pb.Frame(frame_id=frame_id, payload=enc.payload, capture_time_us=cap.capture_time_us,
                               edge_front_ms=enc.timings_ms.get("front_ms", 0.0),
                               edge_encode_ms=enc.timings_ms.get("encode_ms", 0.0),
                               edge_novelty=enc.novelty or 0.0, edge_fallback=enc.fallback or "")
                in_hand = (frame_id, meta)
                emit_all(stream.send(req, meta))
                in_hand = None
            emit_all(stream.finish())
        except ServerUnavailable as e:
            give_up(grpc.StatusCode.UNAVAILABLE, str(e))
            failure = (EXIT_UNREACHABLE, str(e))
        except StreamFailed as e:
            if e.code in REFUSALS:
                hint = {"UNAUTHENTICATED": " (pass --token or set $PALETTELINK_TOKEN)",
                        "PERMISSION_DENIED": " (this token may not use this bundle or task)",
                        "NOT_FOUND": " (the server does not hold this bundle)"}.get(e.code.name, "")
                give_up(e.code, f"server refused the stream: {e}")
                failure = (EXIT_REFUSED, f"server refused the stream: {e}{hint}")
            else:  # INTERNAL, UNKNOWN, DATA_LOSS, …: the server broke; its frames failed (exit 1)
                give_up(e.code, f"the server broke the stream: {e}")
                failure = (EXIT_FRAME_ERRORS, f"the server broke the stream: {e}")
    except KeyboardInterrupt:
        return _fail(130, "interrupted")
    finally:
        if stream is not None:
            stream.close()
        if close_channel:
            channel.close()
        else:
            _HELD.append(channel)  # never collected: collecting it closes it, as close() would
    if stream is not None and stream.reconnects:
        print(f"{PROG}: reconnected {stream.reconnects} time(s)", file=sys.stderr)
    if stream is not None and stream.deferred:
        print(f"{PROG}: the server was overloaded: {stream.deferred} frame(s) re-sent after its retry hint",
              file=sys.stderr)
    _summary(tally)
    if failure is not None:
        return _fail(*failure)
    if unreadable:
        return _fail(EXIT_USAGE, f"{len(unreadable)} input(s) could not be read: {'; '.join(unreadable)}")
    return EXIT_FRAME_ERRORS if sum(tally.values()) > tally[OK] else EXIT_OK


def _summary(tally: Counter[str]) -> None:
    """One stderr line counting the records by outcome, when any failed (not when the only failures
    are unreadable inputs: the error line that follows names them)."""
    failed = sum(n for k, n in tally.items() if k != OK)
    if not failed or failed == tally[NOT_READ]:
        return
    parts = ", ".join(f"{tally[k]} {k.replace('_', ' ')}" for k in OUTCOMES if k != OK and tally[k])
    print(f"{PROG}: {failed} of {sum(tally.values())} frame(s) failed ({parts})", file=sys.stderr)


def main(argv: list[str] | None = None) -> NoReturn:
    """The console script: stream, then leave without closing the channel or tearing down gRPC and
    onnxruntime (:func:`~palettelink.cliutil.exit_without_teardown`: gRPC's channel teardown can
    deadlock, and an edge whose records are all written must exit with their code)."""
    args = build_parser().parse_args(argv)
    exit_without_teardown(quiet_on_broken_pipe(lambda: run(args, close_channel=False)))


if __name__ == "__main__":
    main()
