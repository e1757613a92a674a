"""``palettelink bench-serve``: serving throughput, decode + task, of the server's data plane.

Frames of bus.jpg and zidane.jpg are coded once per codec (baseline at ``--bits``, palette at
``--level``), then answered by a real :class:`server.service.Service` (the object behind gRPC and
HTTP: bitstream check, codec decode, the batching queue, the torch tail, box post-processing):

- **batch 1**: a service with ``max_batch=1``, one frame at a time from one caller (latency-bound);
- **dynamic batching**: a service with ``max_batch=B`` (``--max-batch``, several allowed) and
  ``--clients`` callers sending as fast as they are answered, so frames meet in the batching queue
  (``server/batching.py``) like frames of concurrent streams do.

Each measurement runs ``--seconds`` after a warm-up; it reports frames/s, the mean batch the task saw,
and the per-frame decode / task / queue time. The device is named (CPU model from /proc/cpuinfo, or
the CUDA card torch sees). Prints a table, writes JSON (``--out``).

    palettelink bench-serve --seconds 20 --max-batch 4,8 --clients 16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time
from pathlib import Path
from typing import Any


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return f"{torch.cuda.get_device_name(torch.device(device))} (CUDA)"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        else:
            model = platform.processor() or platform.machine()
    except OSError:
        model = platform.processor() or platform.machine()
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model} ({n} CPUs usable)"


def _ints(text: str) -> list[int]:
    try:
        out = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError("batch sizes are ≥ 1")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", default="fall-yolov8")
    p.add_argument("--bundles", type=Path, default=None, metavar="DIR")
    p.add_argument("--codec", action="append", default=None, help="codec to measure (default: every one)")
    p.add_argument("--bits", type=int, default=4, help="baseline bits of the frames (default 4)")
    p.add_argument("--level", type=int, default=0, help="palette level of the frames (default 0)")
    p.add_argument("--max-batch", type=_ints, default=[8], metavar="B[,B...]",
                   help="max_batch of the dynamic-batching runs (default 8)")
    p.add_argument("--clients", type=int, default=0,
                   help="concurrent callers in the batching runs (default 2 x max_batch)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="the queue's wait for company (default 5)")
    p.add_argument("--seconds", type=float, default=20.0, help="measured time per run (default 20)")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds first (default 3)")
    p.add_argument("--device", default=None,
                   help="torch device (default: cuda when torch sees one, else cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the usable CPUs)")
    p.add_argument("--out", type=Path, default=Path("bench-out/bench-serve.json"))


def _frames(root: Path, bundle_name: str, codecs: list[str] | None, bits: int,
            level: int) -> dict[str, list[bytes]]:
    from palettelink.bundle import find_bundle
    from palettelink.codecs import available, make_encoder
    from palettelink.image import load_image
    from palettelink.samples import sample_images

    bundle = find_bundle(bundle_name, root, side="edge")
    out = {}
    for codec in codecs or available(bundle):
        enc = make_encoder(bundle, codec)
        out[codec] = [enc.encode(load_image(p), bits if codec == "baseline" else level).payload
                      for p in sample_images()]
    return out


def measure(svc: Any, bundle: str, frames: list[bytes], clients: int, seconds: float,
            warmup: float) -> dict[str, Any]:
    """``clients`` threads calling ``svc.analyze`` as fast as answered; counts the ``seconds`` after
    ``warmup``."""
    stop = threading.Event()
    t_measure = time.perf_counter() + warmup
    rows: list[tuple[float, Any]] = []
    errors: list[str] = []
    lock = threading.Lock()

    def caller(k: int) -> None:
        i = k
        while not stop.is_set():
            try:
                r = svc.analyze(bundle, "", frames[i % len(frames)], frame_id=i, client=f"bench-{k}")
            except Exception as e:  # noqa: BLE001 - reported, not raised: one refusal is no crash
                with lock:
                    errors.append(f"{type(e).__name__}: {e}"[:200])
                time.sleep(0.01)
                continue
            done = time.perf_counter()
            if done >= t_measure:
                with lock:
                    rows.append((done, r))
            i += clients

    threads = [threading.Thread(target=caller, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    time.sleep(warmup + seconds)
    t_end = time.perf_counter()
    stop.set()
    for t in threads:
        t.join(120)
    got = [r for done, r in rows if done <= t_end]
    if not got:
        return {"frames": 0, "frames_per_s": 0.0, "errors": errors[:5]}

    def ms(key: str) -> float:
        return round(statistics.mean(getattr(r.timings, key) for r in got), 2)

    return {"frames": len(got), "frames_per_s": round(len(got) / seconds, 2),
            "mean_batch": round(statistics.mean(r.batch_size for r in got), 2),
            "decode_ms": ms("decode_ms"), "task_ms": ms("task_ms"), "queue_ms": ms("queue_ms"),
            "total_ms": ms("total_ms"), "errors": errors[:5], "n_errors": len(errors)}


def run(args: argparse.Namespace) -> int:
    import torch

    from palettelink.bundle import default_root
    from server.service import Service

    root = Path(args.bundles or default_root())
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    frames = _frames(root, args.bundle, args.codec, args.bits, args.level)
    name = device_name(device)
    print(f"bench-serve on {name}, torch {torch.__version__}, {args.seconds:g} s per run", flush=True)
    results: list[dict[str, Any]] = []
    configs = [(1, 1)] + [(b, args.clients or 2 * b) for b in args.max_batch]
    for max_batch, clients in configs:
        svc = Service(root, [args.bundle], device=device, threads=args.threads, max_batch=max_batch,
                      batch_wait_ms=args.batch_wait_ms if max_batch > 1 else 0.0, max_queue=4 * clients + 8,
                      max_pending=4 * clients + 8, max_stream_queue=clients, shed_latency_ms=0,
                      verify=False)
        svc.load()
        try:
            for codec, fr in frames.items():
                m = measure(svc, args.bundle, fr, clients, args.seconds, args.warmup)
                row = {"codec": codec, "max_batch": max_batch, "clients": clients,
                       "mode": "batch 1" if max_batch == 1 else "dynamic batching",
                       "payload_bytes": [len(f) for f in fr], **m}
                results.append(row)
                print(f"  {codec:<9} max_batch {max_batch:>2}  clients {clients:>2}  "
                      f"{m['frames_per_s']:>8.2f} frames/s  mean batch {m.get('mean_batch', 0):>5}",
                      flush=True)
        finally:
            svc.close()
    print(format_table(name, results))
    report = {"device": name, "torch_device": device, "torch": torch.__version__, "seconds": args.seconds,
              "bits": args.bits, "level": args.level, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def format_table(device: str, results: list[dict[str, Any]]) -> str:
    lines = [f"serving throughput, decode + task ({device})",
             f"| {'codec':<8} | {'mode':<16} | max_batch | clients | frames/s | mean batch | decode ms | "
             f"task ms | queue ms |",
             "|----------|------------------|----------:|--------:|---------:|-----------:|----------:|"
             "--------:|---------:|"]
    for r in results:
        lines.append(f"| {r['codec']:<8} | {r['mode']:<16} | {r['max_batch']:>9} | {r['clients']:>7} | "
                     f"{r['frames_per_s']:>8.2f} | {r.get('mean_batch', 0):>10} | "
                     f"{r.get('decode_ms', 0):>9} | {r.get('task_ms', 0):>7} | {r.get('queue_ms', 0):>8} |")
    return "\n".join(lines)
