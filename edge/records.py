"""What ``palettelink-edge`` makes of each input frame: one record (a text line, or a JSON object with
``--json``) in every outcome (:data:`OUTCOMES`), from the server's answer or from the edge itself
(:func:`edge_reply`: a frame not sent or not read), and the rebuilt picture saved when asked for
(:func:`save_preview`). Nothing here talks to the server.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, TextIO

import grpc

from edge.transport import Reply
from palettelink.bundle import atomic_write_bytes
from palettelink.v1 import palettelink_pb2 as pb

# A record's outcome (its "outcome" field), in the order the summary lists them.
OK, FAILED, REFUSED, NOT_ANSWERED, NOT_SENT, NOT_READ = "ok", "failed", "refused", "not_answered", \
    "not_sent", "not_read"
OUTCOMES = (OK, FAILED, REFUSED, NOT_ANSWERED, NOT_SENT, NOT_READ)


@dataclass
class FrameMeta:
    label: str
    source: str
    index: int
    n_bytes: int
    level: int
    image_size: tuple[int, int]
    timings_ms: dict[str, float]
    outcome: str | None = None  # set for the records the edge makes itself (not sent, not read)
    novelty: float | None = None  # how far the frame lies from what the codec learned (None: not measured)
    fallback: str | None = None  # what rate control did about a novel frame


def outcome_of(reply: Reply) -> str:
    m = reply.meta
    if isinstance(m, FrameMeta) and m.outcome:
        return m.outcome
    if not reply.answered:
        return NOT_ANSWERED
    r = reply.result
    if r.HasField("error") and r.error.status:
        return REFUSED if r.error.status == "RESOURCE_EXHAUSTED" else FAILED
    return OK


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
        "source": m.source, "frame": m.index, "frame_id": reply.frame_id, "outcome": outcome_of(reply),
        "codec": r.codec or None, "level": r.level if r.codec else m.level,
        "bytes": n_bytes, "bpp": round(8.0 * n_bytes / (w * h), 4) if w * h else 0.0, "width": w, "height": h,
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
        "novelty": None if m.novelty is None else round(m.novelty, 6),
        "fallback": m.fallback,
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
    if rec["outcome"] in (NOT_SENT, NOT_READ):  # nothing was coded or sent: no sizes or times to show
        out.write(f"{label}  {rec['error']['status']}: {rec['error']['message']}\n")
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


def preview_name(label: str, taken: set[str] | None = None) -> str:
    """The file name of a frame's preview: its source name once, as a .jpg (``samples/bus.jpg`` →
    ``samples_bus.jpg``, ``clip.avi#12`` → ``clip#12.jpg``, ``a/x.png`` → ``a_x.jpg``); path
    separators become ``_``; a name already ``taken`` in this run gets ``~2``, ``~3``, …"""
    source, hash_, index = label.rpartition("#") if "#" in label else (label, "", "")
    stem = PurePath(source).with_suffix("").as_posix() if PurePath(source).suffix else source
    stem = stem.lstrip("./") + (f"#{index}" if hash_ else "")
    safe = "".join(c if c.isalnum() or c in "-_.#" else "_" for c in stem).strip("_")[-120:] or "frame"
    name, n = f"{safe}.jpg", 1
    while taken is not None and name in taken:
        n += 1
        name = f"{safe}~{n}.jpg"
    if taken is not None:
        taken.add(name)
    return name


def save_preview(folder: Path, label: str, jpeg: bytes, taken: set[str] | None = None) -> Path:
    """DIR/:func:`preview_name`, written atomically."""
    path = folder / preview_name(label, taken)
    atomic_write_bytes(path, jpeg)
    return path


def status_code(name: str) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, name, grpc.StatusCode.INVALID_ARGUMENT)


def edge_reply(frame_id: int, meta: FrameMeta, code: grpc.StatusCode, message: str) -> Reply:
    """The record of a frame the edge itself fails (not sent, not read): never answered by the server."""
    res = pb.FrameResult(frame_id=frame_id, error=pb.FrameError(code=int(code.value[0]), status=code.name,
                                                                message=message))
    return Reply(frame_id, res, 0.0, meta, answered=False)
