"""``palettelink-edge``: capture → ONNX front → codec → gRPC stream → print the server's results.

Exit codes: 0 all frames answered; 1 some frames came back with an error or some inputs could not be
read (too large, corrupt: named on stderr, the others still streamed); 2 bad arguments, inputs or
bundle; 3 server unreachable (not resolvable, or not answering within ``--connect-timeout``, or lost
or frozen for good mid-stream: every frame unanswered, and with ``--json`` every input not sent, then
gets one failed record with the reason); 4 the server refused the stream (token, unknown bundle, …);
141 stdout closed early (``| head``). This module and everything it imports stay free of torch (tested).

Bundles: the edge loads only the edge part of a bundle (``side="edge"``: front, codec graphs and
tables), from ``--bundles``, else from the fetch cache; ``--fetch-bundle NAME[/VERSION]`` (or
``--bundle NAME`` with ``--http URL`` when no copy is found) downloads it from the server's HTTP side
into the cache first (:mod:`palettelink.fetch`). The HTTP address is ``--http URL``, by default the
``--server`` host on port 8000 (https with ``--tls-ca``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import grpc

from edge.transport import (
    Backoff,
    EdgeStream,
    Reply,
    ServerUnavailable,
    StreamFailed,
    make_channel,
    wait_ready,
)
from palettelink import capture
from palettelink.bundle import Bundle, find_bundle
from palettelink.cliutil import add_version, quiet_on_broken_pipe
from palettelink.codecs import EdgeEncoder, default_codec, make_encoder, spec
from palettelink.errors import BundleNotFound, InvalidRequest, PaletteLinkError, Unauthenticated
from palettelink.fetch import Client, FetchError, default_cache, default_http_url, fetch_bundle
from palettelink.ratecontrol import LevelCoder, controller_from
from palettelink.v1 import palettelink_pb2 as pb

EXIT_OK, EXIT_FRAME_ERRORS, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_REFUSED = 0, 1, 2, 3, 4
PROG = "palettelink-edge"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Stream images, folders or videos to a PaletteLink server as coded features.",
        epilog="exit codes: 0 ok, 1 some frames failed, 2 bad input/bundle, 3 server unreachable, "
               "4 server refused the stream",
    )
    p.add_argument("paths", nargs="*", metavar="PATH",
                   help="image files, folders (recursive) or video files; camera:N for a camera")
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
    p.add_argument("--codec", default=None, help="baseline or palette (default: the bundle's best)")
    rate = p.add_mutually_exclusive_group()
    rate.add_argument("--bits", type=int, default=None, help="baseline: bits per value (2..8)")
    rate.add_argument("--level", type=int, default=None, help="codec level (palette: diffusion step)")
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
    p.add_argument("--connect-timeout", type=float, default=5.0, metavar="S",
                   help="seconds to wait for the first connection, DNS included (default 5); then exit 3")
    p.add_argument("--frame-timeout", type=float, default=30.0, metavar="S",
                   help="a frame unanswered for S seconds is reported failed (DEADLINE_EXCEEDED) and the "
                        "stream re-opened; counts against --retries like a lost connection (default 30)")
    add_version(p)
    return p


@dataclass
class FrameMeta:
    label: str
    source: str
    index: int
    n_bytes: int
    level: int
    image_size: tuple[int, int]
    timings_ms: dict[str, float]


def _box_dict(b: pb.Box, names: Sequence[str]) -> dict[str, Any]:
    name = b.class_name or (names[b.class_id] if 0 <= b.class_id < len(names) else str(b.class_id))
    return {"class_id": b.class_id, "class_name": name, "score": round(float(b.score), 4),
            "xyxy": [round(float(v), 1) for v in (b.x1, b.y1, b.x2, b.y2)]}


def _mask_dict(m: pb.Mask) -> dict[str, Any]:
    """A mask's size and coverage (the runs themselves stay in the reply: the edge only reports)."""
    ones = sum(int(c) for c in list(m.counts)[1::2])
    area = max(1, int(m.width) * int(m.height))
    return {"width": int(m.width), "height": int(m.height), "pixels": ones, "fraction": round(ones / area, 4),
            "counts": len(m.counts)}


def reply_record(reply: Reply, names: Sequence[str]) -> dict[str, Any]:
    """What one answered frame turns into: the ``--json`` line, also the source of the text line."""
    r, m = reply.result, reply.meta
    assert isinstance(m, FrameMeta)
    w, h = m.image_size
    n_bytes = int(r.payload_bytes) or m.n_bytes
    rec: dict[str, Any] = {
        "source": m.source, "frame": m.index, "frame_id": reply.frame_id,
        "codec": r.codec or None, "level": r.level if r.codec else m.level,
        "bytes": n_bytes, "bpp": round(8.0 * n_bytes / (w * h), 4), "width": w, "height": h,
        "boxes": [_box_dict(b, names) for b in r.boxes],
        "masks": [_mask_dict(mk) for mk in r.masks],
        "landmarks": [{"scheme": ls.scheme, "score": round(float(ls.score), 4),
                       "points": [[round(float(q.x), 1), round(float(q.y), 1), round(float(q.visibility), 3)]
                                  for q in ls.points]} for ls in r.landmarks],
        "preview_bytes": len(r.preview_jpeg),
        "latency_ms": round(reply.latency_ms, 2),
        "edge_ms": {k: round(v, 2) for k, v in m.timings_ms.items()},
        "server_ms": {k: round(getattr(r.timings, k), 2)
                      for k in ("decode_ms", "task_ms", "queue_ms", "total_ms")},
        "truncated": bool(r.truncated),
        "error": None,
    }
    if r.HasField("error") and r.error.status:
        rec["error"] = {"status": r.error.status, "message": r.error.message}
    return rec


def print_record(rec: dict[str, Any], label: str, out: TextIO, as_json: bool) -> None:
    if as_json:
        out.write(json.dumps(rec) + "\n")
        out.flush()
        return
    head = (f"{label}  {rec['bytes']:,} B  {rec['bpp']:.3f} bpp  {rec['codec'] or '?'}/{rec['level']}  "
            f"rtt {rec['latency_ms']:.1f} ms  (front {rec['edge_ms'].get('front_ms', 0):.1f}, "
            f"encode {rec['edge_ms'].get('encode_ms', 0):.1f}, server {rec['server_ms']['total_ms']:.1f})")
    if rec["error"]:
        out.write(f"{head}  ERROR {rec['error']['status']}: {rec['error']['message']}\n")
    else:
        extra = "".join(f", {len(rec[k])} {k}" for k in ("masks", "landmarks") if rec[k])
        out.write(f"{head}  {len(rec['boxes'])} box(es){extra}\n")
        for i, b in enumerate(rec["boxes"]):
            x1, y1, x2, y2 = b["xyxy"]
            pts = rec["landmarks"][i] if i < len(rec["landmarks"]) else None
            more = f"  {len(pts['points'])} {pts['scheme']} points" if pts else ""
            out.write(f"    {b['class_name']:<12} {b['score']:.2f}  "
                      f"[{x1:7.1f} {y1:7.1f} {x2:7.1f} {y2:7.1f}]{more}\n")
        for m in rec["masks"]:
            out.write(f"    mask {m['width']}x{m['height']}  {100 * m['fraction']:.1f} % of the image\n")
        if rec["preview_bytes"]:
            out.write(f"    preview {rec['preview_bytes']:,} B\n")
    out.flush()


def save_preview(folder: Path, label: str, jpeg: bytes) -> Path:
    """DIR/<label>.jpg, written atomically (a label's path separators become '_')."""
    from palettelink.bundle import atomic_write_bytes

    safe = "".join(c if c.isalnum() or c in "-_.#" else "_" for c in label)[:120] or "frame"
    path = folder / f"{safe}.jpg"
    atomic_write_bytes(path, jpeg)
    return path


def _fail(code: int, msg: str) -> int:
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    return code


def _level_for(args: argparse.Namespace, codec: str) -> int | None:
    if args.bits is not None and spec(codec).param != "bits":
        raise InvalidRequest(f"--bits is for a codec whose levels are bit depths (baseline); "
                             f"use --level with {codec}")
    return args.bits if args.bits is not None else args.level


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


def run(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    skipped: list[str] = []

    def skip(src: capture.Source, err: PaletteLinkError) -> None:  # one bad input never stops the others
        skipped.append(src.name)
        print(f"{PROG}: skipped: {err}", file=sys.stderr, flush=True)

    try:
        _check_limits(args)
        if not args.bundle and not args.fetch_bundle:
            raise InvalidRequest("give --bundle NAME (or --fetch-bundle NAME to download it)")
        if not args.paths and not args.fetch_bundle:
            raise InvalidRequest("give at least one PATH to stream")
        if args.paths:
            sources = capture.expand(args.paths)
            frames = capture.iter_frames(sources, args.every, args.max_frames, on_error=skip)
        bundle = _bundle(args)
        if not args.paths:
            print(f"{bundle.id} {bundle.path}", file=out)
            return EXIT_OK
        codec = args.codec or default_codec(bundle)
        encoder: EdgeEncoder = make_encoder(bundle, codec)
        coder = LevelCoder(encoder, controller_from(_level_for(args, codec), args.target_bpp,
                                                    args.target_bytes, args.kbps, args.fps))
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

    backoff = Backoff(retries=args.retries)
    metadata = [("authorization", f"Bearer {args.token}")] if args.token else []
    names = bundle.class_names
    n_frames = n_errors = 0
    stream: EdgeStream | None = None
    in_hand: tuple[int, FrameMeta] | None = None  # the frame being handed to the stream

    def emit(replies: Iterator[Reply]) -> None:
        nonlocal n_frames, n_errors
        for reply in replies:
            rec = reply_record(reply, names)
            if args.preview is not None and reply.result.preview_jpeg:
                save_preview(args.preview, reply.meta.label, reply.result.preview_jpeg)
            print_record(rec, reply.meta.label, out, args.json)
            n_frames += 1
            n_errors += rec["error"] is not None

    def give_up(code: grpc.StatusCode, reason: str) -> None:
        """The stream is lost for good: every frame sent and unanswered, the one in hand and (with
        --json) every input not read yet gets its one record, failed with ``reason``."""
        nonlocal n_unsent
        if stream is not None:
            emit(stream.abandon(reason, code))
        if in_hand is not None and (stream is None or not stream.pending(in_hand[0])):
            emit(iter([_unsent(in_hand[0], in_hand[1], code, reason)]))
        if not args.json:
            return
        for frame_id, cap in enumerate(frames, start=next_id):
            h, w = cap.rgb.shape[:2]
            meta = FrameMeta(cap.label, cap.source, cap.index, 0, -1, (w, h), {})
            n_unsent += 1
            emit(iter([_unsent(frame_id, meta, code, reason)]))

    n_unsent = next_id = 0
    try:
        wait_ready(channel, args.server, args.connect_timeout)
        header = pb.StreamHeader(client_id=args.client_id, bundle=bundle.id, task=args.task or bundle.task,
                                 want_preview=args.preview is not None)
        stream = EdgeStream(channel, header, metadata, window=args.window, backoff=backoff,
                            frame_timeout=args.frame_timeout)

        for frame_id, cap in enumerate(frames):
            next_id = frame_id + 1
            coded = coder.encode(cap.rgb)
            enc = coded.encoded
            if coded.choice is not None and coded.choice.warning:
                print(f"{PROG}: {cap.label}: {coded.choice.warning}", file=sys.stderr)
            meta = FrameMeta(cap.label, cap.source, cap.index, len(enc.payload), enc.level,
                             enc.image_size, enc.timings_ms)
            req = pb.Frame(frame_id=frame_id, payload=enc.payload, capture_time_us=cap.capture_time_us,
                           edge_front_ms=enc.timings_ms.get("front_ms", 0.0),
                           edge_encode_ms=enc.timings_ms.get("encode_ms", 0.0))
            in_hand = (frame_id, meta)
            emit(stream.send(req, meta))
            in_hand = None
        emit(stream.finish())
    except PaletteLinkError as e:
        return _fail(EXIT_USAGE, str(e))
    except ServerUnavailable as e:
        if stream is not None:
            give_up(grpc.StatusCode.UNAVAILABLE, str(e))
            _summary(n_frames, n_errors, n_unsent)
        return _fail(EXIT_UNREACHABLE, str(e))
    except StreamFailed as e:
        hint = {"UNAUTHENTICATED": " (pass --token or set $PALETTELINK_TOKEN)",
                "NOT_FOUND": " (the server does not hold this bundle)"}.get(e.code.name, "")
        give_up(e.code, f"server refused the stream: {e}")
        _summary(n_frames, n_errors, n_unsent)
        return _fail(EXIT_REFUSED, f"server refused the stream: {e}{hint}")
    except KeyboardInterrupt:
        return _fail(130, "interrupted")
    finally:
        if stream is not None:
            stream.close()
        channel.close()
    if stream is not None and stream.reconnects:
        print(f"{PROG}: reconnected {stream.reconnects} time(s)", file=sys.stderr)
    if stream is not None and stream.deferred:
        print(f"{PROG}: the server was overloaded: {stream.deferred} frame(s) re-sent after its retry hint",
              file=sys.stderr)
    if skipped:
        print(f"{PROG}: {len(skipped)} input(s) could not be read: {', '.join(skipped)}", file=sys.stderr)
    _summary(n_frames, n_errors, 0)
    return EXIT_FRAME_ERRORS if n_errors or skipped else EXIT_OK


def _summary(n_frames: int, n_errors: int, n_unsent: int) -> None:
    if n_errors:
        unsent = f" ({n_unsent} never sent)" if n_unsent else ""
        print(f"{PROG}: {n_errors} of {n_frames} frame(s) failed{unsent}", file=sys.stderr)


def _unsent(frame_id: int, meta: FrameMeta, code: grpc.StatusCode, reason: str) -> Reply:
    """The record of a frame never sent (the stream was lost before its turn)."""
    res = pb.FrameResult(frame_id=frame_id, error=pb.FrameError(code=int(code.value[0]), status=code.name,
                                                                message=f"not sent: {reason}"))
    return Reply(frame_id, res, 0.0, meta)


def main(argv: list[str] | None = None) -> int:
    return quiet_on_broken_pipe(lambda: run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
