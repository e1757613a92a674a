"""``palettelink bench-serve``: serving throughput, decode + task, of the server's data plane.

Frames of bus.jpg and zidane.jpg (resized to ``--size WxH`` like a camera's, e.g. 640x480) are coded
once per codec (baseline at ``--bits``, palette at ``--level``), then answered by a real
:class:`server.service.Service` (the object behind gRPC and HTTP: bitstream check, codec decode, the
batching queue, the tail, box post-processing). The tail and the palette decoder run as the server
runs them: in onnxruntime on the frame's window where the bundle has ``tail.onnx`` (int8 where the
build kept it; :mod:`palettelink.models.ultra_ort`), else the torch tail; ``--runtime torch`` asks
for the torch path; each row names the path (``serve_path``):

- **batch 1**: a service with ``max_batch=1``, one frame at a time from one caller (latency-bound);
- **dynamic batching**: a service with ``max_batch=B`` (``--max-batch``, several allowed) and
  ``--clients`` callers sending as fast as they are answered, so frames meet in the batching queue
  (``server/batching.py``) like frames of concurrent streams do.

Each measurement runs ``--seconds`` after a warm-up, ``--repeat`` times (default 3) on the same loaded
service; per run it counts frames/s and the mean batch the task saw, and over the runs it reports the
median frames/s and its spread (the runs' p10–p90 and (p90 − p10) / median), with the per-frame
decode / task / queue medians and the p50/p90 of the server time per frame. ``--task`` picks tasks of
the bundle (default: every one the server runs on it), so the table has one row per codec, task and
batching mode. The device is named (the CPU model and the usable CPUs: affinity and cgroup quota, or
the CUDA card torch sees), with torch's and onnxruntime's thread counts and providers.

``--device cuda`` on a machine where torch sees no GPU does not fail: it says so on stderr and in the
JSON (``fallback``) and measures on the CPU (``scripts/bench-gpu.sh`` relies on this). The codec
decoders are onnxruntime sessions: on CUDA only where the installed onnxruntime has the CUDA provider
(onnxruntime-gpu; the report names the providers).

    palettelink bench-serve --seconds 20 --max-batch 4,8 --clients 16
    palettelink bench-serve --device cuda --max-batch 8,32 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from palettelink import cpu
from palettelink.bench.edge_speed import _size
from palettelink.cliutil import positive_ints


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return f"{torch.cuda.get_device_name(torch.device(device))} (CUDA)"
    return f"{cpu.cpu_model()} ({cpu.usable_cpus()} CPUs usable)"


def cuda_fallback(device: str) -> str | None:
    """Why ``device`` (a CUDA one) cannot be used here, or None when it can (or is not CUDA)."""
    if not device.startswith("cuda"):
        return None
    import torch

    if not torch.cuda.is_available():
        build = torch.version.cuda
        why = "this torch has no CUDA support (a CPU build)" if not build else \
            f"torch (CUDA {build}) sees no GPU: no NVIDIA driver or device visible"
        return f"no GPU: {why}"
    index = torch.device(device).index or 0
    if index >= torch.cuda.device_count():
        return f"no GPU {device}: torch sees {torch.cuda.device_count()} CUDA device(s)"
    return None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", default="fall-yolov8")
    p.add_argument("--bundles", type=Path, default=None, metavar="DIR")
    p.add_argument("--codec", action="append", default=None, help="codec to measure (default: every one)")
    p.add_argument("--bits", type=int, default=4, help="baseline bits of the frames (default 4)")
    p.add_argument("--level", type=int, default=None,
                   help="palette (or avif) level of the frames (default: the codec's default level)")
    p.add_argument("--size", type=_size, default=None, metavar="WxH",
                   help="resize the sample frames to WxH like a camera's (e.g. 640x480; default: as is)")
    p.add_argument("--max-batch", type=positive_ints, default=[8], metavar="B[,B...]",
                   help="max_batch of the dynamic-batching runs (default 8)")
    p.add_argument("--clients", type=int, default=0,
                   help="concurrent callers in the batching runs (default 2 x max_batch)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="the queue's wait for company (default 5)")
    p.add_argument("--seconds", type=float, default=20.0, help="measured time per run (default 20)")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds first (default 3)")
    p.add_argument("--repeat", type=int, default=3,
                   help="measured runs per row, after one warm-up (default 3): median and spread")
    p.add_argument("--task", action="append", default=None,
                   help="task to measure (default: every task the server runs on the bundle)")
    p.add_argument("--no-batching", action="store_true", help="batch 1 only (no dynamic-batching rows)")
    p.add_argument("--device", default=None,
                   help="torch device (default: cuda when torch sees one, else cpu); cuda without a GPU "
                        "falls back to cpu with a message")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the usable CPUs)")
    p.add_argument("--runtime", choices=("auto", "torch"), default="auto",
                   help="auto: onnxruntime decoder window and tail where the bundle has tail.onnx (int8 "
                        "where kept), else torch; torch: the torch tail on the whole latent (the old path)")
    p.add_argument("--canvas", choices=("window", "square"), default="window",
                   help="palette frames coded as the frame's window of the letterbox (default, what an edge "
                        "sends a server that decodes windows) or the whole square")
    p.add_argument("--out", type=Path, default=Path("bench-out/bench-serve.json"))


def _frames(root: Path, bundle_name: str, codecs: list[str] | None, bits: int,
            level: int, size: tuple[int, int] | None = None, canvas: str = "window"
            ) -> dict[str, list[bytes]]:
    from palettelink.bench.edge_speed import frames_at
    from palettelink.bundle import find_bundle
    from palettelink.codecs import available, make_encoder
    from palettelink.codecs.palette.window import use_window
    from palettelink.image import load_image
    from palettelink.samples import sample_images

    bundle = find_bundle(bundle_name, root, side="edge")
    rgbs = [rgb for _, rgb in frames_at(["samples:"], size)] if size else \
        [load_image(p) for p in sample_images()]
    out = {}
    for codec in codecs or available(bundle):
        enc = make_encoder(bundle, codec)
        use_window(enc, canvas == "window")  # what an edge sends this server (it decodes windows)
        out[codec] = [enc.encode(rgb, bits if codec == "baseline" else level).payload for rgb in rgbs]
    return out


MAX_WAIT_S = 120.0  # how long a run may overrun --seconds waiting for its first answered frame


def measure(svc: Any, bundle: str, frames: list[bytes], clients: int, seconds: float,
            warmup: float, task: str = "") -> dict[str, Any]:
    """``clients`` threads calling ``svc.analyze`` as fast as answered; counts the frames answered in
    the ``seconds`` after ``warmup`` (longer where none was answered by then), per second measured."""
    stop = threading.Event()
    t_measure = time.perf_counter() + warmup
    rows: list[tuple[float, Any]] = []
    errors: list[str] = []
    lock = threading.Lock()

    def caller(k: int) -> None:
        i = k
        while not stop.is_set():
            try:
                r = svc.analyze(bundle, task, frames[i % len(frames)], frame_id=i, client=f"bench-{k}")
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
    # a run lasts until it has answered a frame (a slow path on a busy box can take longer than
    # --seconds per frame: 0 frames/s would be a wrong figure, not a slow one), at most MAX_WAIT_S more
    give_up = time.perf_counter() + MAX_WAIT_S
    while not rows and not errors and time.perf_counter() < give_up:
        time.sleep(0.02)
    t_end = time.perf_counter()
    measured_s = t_end - t_measure
    stop.set()
    for t in threads:
        t.join(120)
    got = [r for done, r in rows if done <= t_end]
    if not got:
        return {"frames": 0, "frames_per_s": 0.0, "errors": errors[:5], "n_errors": len(errors),
                "total_samples_ms": []}

    def ms(key: str) -> float:
        return round(statistics.median(getattr(r.timings, key) for r in got), 2)

    return {"frames": len(got), "frames_per_s": round(len(got) / measured_s, 2),
            "mean_batch": round(statistics.mean(r.batch_size for r in got), 2),
            "decode_ms": ms("decode_ms"), "task_ms": ms("task_ms"), "queue_ms": ms("queue_ms"),
            "total_ms": ms("total_ms"), "errors": errors[:5], "n_errors": len(errors),
            "total_samples_ms": [float(r.timings.total_ms) for r in got]}


def spread(values: list[float]) -> dict[str, float]:
    """Median, p10, p90 and (p90 − p10) / median in % of ``values`` (the runs' frames/s)."""
    a = np.asarray(values, np.float64)
    med, p10, p90 = (float(np.percentile(a, q)) for q in (50, 10, 90))
    return {"median": round(med, 2), "p10": round(p10, 2), "p90": round(p90, 2),
            "spread_pct": round(100.0 * (p90 - p10) / med, 1) if med > 0 else 0.0}


def repeated(svc: Any, bundle: str, frames: list[bytes], clients: int, seconds: float, warmup: float,
             task: str, repeat: int) -> dict[str, Any]:
    """``repeat`` measurements after one warm-up (the first only): frames/s median and spread over the
    runs, per-frame medians of the runs pooled, server time p50/p90 per frame."""
    runs = [measure(svc, bundle, frames, clients, seconds, warmup if i == 0 else 0.0, task)
            for i in range(repeat)]
    fps = [r["frames_per_s"] for r in runs]
    total = [x for r in runs for x in r["total_samples_ms"]]
    ok = [r for r in runs if r["frames"]]

    def med(key: str) -> float:
        return round(float(np.median([r[key] for r in ok])), 2) if ok else 0.0

    return {"frames": sum(r["frames"] for r in runs), "runs": len(runs),
            "frames_per_s": spread(fps)["median"], "frames_per_s_runs": fps, "fps": spread(fps),
            "mean_batch": med("mean_batch"), "decode_ms": med("decode_ms"), "task_ms": med("task_ms"),
            "queue_ms": med("queue_ms"), "total_ms": med("total_ms"),
            "total_p50_ms": round(float(np.percentile(total, 50)), 2) if total else None,
            "total_p90_ms": round(float(np.percentile(total, 90)), 2) if total else None,
            "errors": [e for r in runs for e in r["errors"]][:5],
            "n_errors": sum(r["n_errors"] for r in runs)}


def _thread_counts(device: str) -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    from palettelink.front import session_settings

    return {"torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "onnxruntime_intra_op_threads": session_settings()["intra_op_threads"],
            "onnxruntime": ort.__version__, "onnxruntime_providers": ort.get_available_providers(),
            "cuda_decoders": "CUDAExecutionProvider" in ort.get_available_providers()}


def serve_path(svc: Any, bundle_id: str, task: str) -> dict[str, Any]:
    """Which runtime answers ``task``: the tail (onnxruntime file and precision, or torch), the palette
    decoder's graph and whether it runs on the frame's window."""
    lb = svc.bundles[bundle_id]
    runner = lb.batchers[task].runner
    impl = getattr(runner, "impl", runner)
    tail = getattr(getattr(impl, "tail", None), "graph", None)
    out: dict[str, Any] = {"runtime": getattr(runner, "runtime", "torch"),
                           "tail": f"{tail.file} ({tail.precision})" if tail is not None else "torch"}
    try:
        dec = lb.decoder._get("palette")
    except Exception:  # noqa: BLE001 - a bundle without the palette codec
        return out
    graph = getattr(dec, "graph", None)
    out["decoder"] = f"{graph.file} ({graph.precision})" if graph is not None else "decoder.onnx"
    out["window"] = bool(getattr(dec, "window", False))
    return out


def run(args: argparse.Namespace) -> int:
    import os

    from palettelink.models.ultra_ort import RUNTIME_ENV

    saved = os.environ.get(RUNTIME_ENV)
    os.environ[RUNTIME_ENV] = args.runtime  # read where the service builds its runners
    try:
        return _run(args)
    finally:
        if saved is None:
            os.environ.pop(RUNTIME_ENV, None)
        else:
            os.environ[RUNTIME_ENV] = saved


def _run(args: argparse.Namespace) -> int:
    import sys

    import torch

    from palettelink.bundle import default_root, find_bundle
    from palettelink.errors import InvalidRequest
    from server.service import Service
    from server.tasks import tasks_for

    if args.repeat < 1 or args.seconds <= 0 or args.warmup < 0:
        raise InvalidRequest("--repeat must be ≥ 1, --seconds > 0, --warmup ≥ 0")
    root = Path(args.bundles or default_root())
    asked = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    bundle = find_bundle(args.bundle, root, verify=False)
    tasks = args.task or tasks_for(bundle)
    unknown = [t for t in tasks if t not in tasks_for(bundle)]
    if unknown:
        raise InvalidRequest(f"bundle {bundle.id} runs tasks {tasks_for(bundle)}, not {unknown}")
    frames = _frames(root, args.bundle, args.codec, args.bits, args.level, args.size, args.canvas)
    fallback = cuda_fallback(asked)
    device = "cpu" if fallback else asked
    if fallback:
        print(f"bench-serve: {fallback}; --device {asked} falls back to cpu", file=sys.stderr, flush=True)
    name = device_name(device)
    print(f"bench-serve on {name}, torch {torch.__version__}, {args.seconds:g} s per run × {args.repeat} "
          f"runs", flush=True)
    results: list[dict[str, Any]] = []
    configs = [(1, 1)] + ([] if args.no_batching else [(b, args.clients or 2 * b) for b in args.max_batch])
    threads: dict[str, Any] = {}
    for max_batch, clients in configs:
        svc = Service(root, [args.bundle], device=device, threads=args.threads, max_batch=max_batch,
                      batch_wait_ms=args.batch_wait_ms if max_batch > 1 else 0.0, max_queue=4 * clients + 8,
                      max_pending=4 * clients + 8, max_stream_queue=clients, shed_latency_ms=0,
                      verify=False)
        svc.load()
        threads = _thread_counts(device)
        try:
            for task in tasks:
                path = serve_path(svc, bundle.id, task)
                print(f"  {task}: " + ", ".join(f"{k} {v}" for k, v in path.items()), flush=True)
                for codec, fr in frames.items():
                    m = repeated(svc, args.bundle, fr, clients, args.seconds, args.warmup, task, args.repeat)
                    row = {"codec": codec, "task": task, "max_batch": max_batch, "clients": clients,
                           "mode": "batch 1" if max_batch == 1 else "dynamic batching", "serve_path": path,
                           "payload_bytes": [len(f) for f in fr], **m}
                    results.append(row)
                    f = m["fps"]
                    print(f"  {codec:<9} {task:<9} max_batch {max_batch:>2}  clients {clients:>2}  "
                          f"{f['median']:>8.2f} frames/s (p10–p90 {f['p10']:.2f}–{f['p90']:.2f})  "
                          f"mean batch {m.get('mean_batch', 0):>5}", flush=True)
        finally:
            svc.close()
    print(format_table(name, results))
    print(f"threads: torch {threads.get('torch_threads')} intra-op / {threads.get('torch_interop_threads')} "
          f"inter-op, onnxruntime {threads.get('onnxruntime_intra_op_threads')} intra-op; onnxruntime "
          f"providers {', '.join(threads.get('onnxruntime_providers', []))}")
    report = {"device": name, "torch_device": device, "requested_device": asked, "fallback": fallback,
              "torch": torch.__version__, "cpus": cpu.describe(), **threads,
              "cuda_device": name if device.startswith("cuda") else None, "seconds": args.seconds,
              "warmup": args.warmup, "repeat": args.repeat, "bits": args.bits, "level": args.level,
              "runtime": args.runtime, "size": list(args.size) if args.size else None, "canvas": args.canvas,
              "bundle": bundle.id, "tasks": tasks, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def format_table(device: str, results: list[dict[str, Any]]) -> str:
    lines = [f"serving throughput, decode + task ({device}); frames/s: median of the runs (p10–p90)",
             f"| {'codec':<8} | {'task':<9} | {'mode':<16} | max_batch | clients | frames/s (p10–p90)     | "
             "mean batch | decode ms | task ms | queue ms | server p50/p90 ms |",
             "|----------|-----------|------------------|----------:|--------:|------------------------|"
             "-----------:|----------:|--------:|---------:|------------------:|"]
    for r in results:
        f = r.get("fps") or {"median": r.get("frames_per_s", 0), "p10": 0, "p90": 0}
        fps = f"{f['median']:.2f} ({f['p10']:.2f}–{f['p90']:.2f})"
        lat = f"{r.get('total_p50_ms') or 0:.0f} / {r.get('total_p90_ms') or 0:.0f}"
        lines.append(f"| {r['codec']:<8} | {r.get('task', ''):<9} | {r['mode']:<16} | {r['max_batch']:>9} | "
                     f"{r['clients']:>7} | {fps:<22} | {r.get('mean_batch', 0):>10} | "
                     f"{r.get('decode_ms', 0):>9} | {r.get('task_ms', 0):>7} | {r.get('queue_ms', 0):>8} | "
                     f"{lat:>17} |")
    return "\n".join(lines)
