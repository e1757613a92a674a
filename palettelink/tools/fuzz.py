"""``palettelink fuzz``: a structure-aware mutator over real coded frames of every codec a bundle offers.

Each case is one mutation of a real frame (bus.jpg / zidane.jpg through each codec's encoder): a cut
at a byte, bit flips, zeroed 32-bit words (a layer's last word above all: constriction refuses ANS data
ending in a zero word), header fields (version, codec, param, flags, bundle id length, image size,
tensor count and shapes, layer count and lengths) set to extremes, layers dropped, emptied, reordered,
repeated or taken from the other image or codec, splices of two frames at random offsets and random
bytes in a layer. Most mutations come twice: as raw damage (the chained CRC-32 must refuse it) and
re-checksummed, so the damage reaches the codec's own parser and decoder.

The seed frames and the mutator are in :mod:`palettelink.tools.mutator`, the targets in
:mod:`palettelink.tools.fuzz_targets`. A case is decoded in-process through
:class:`palettelink.codecs.Decoder` (what the server runs on the bytes of a client) or, with
``--server``, sent with the gRPC Analyze call to a real server. Its outcome is ``ok`` (decoded), the
typed error's status (``INVALID_ARGUMENT``, ``FAILED_PRECONDITION``, …) or a crash: any exception
outside the :class:`~palettelink.errors.PaletteLinkError` family in-process, an INTERNAL or UNKNOWN
status from a server. A case running past ``--time-limit`` is a hang. Exit 1 when there is any crash or
hang.

In-process, a mutated frame that parses to a container already decoded (e.g. two cuts inside the same
layer of a progressive frame) reuses that outcome: the decode after parsing depends on the parsed frame
only. ``--skip-network`` (for quick runs) also stops the palette decoder before its decoder network,
which sees index maps the codec already validated, never client bytes, and the avif decoder once the
picture is decoded, before the bundle's front (which sees a checked picture of the frame's size).
"""

from __future__ import annotations

import argparse
import json
import queue
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from palettelink.bundle import default_root, find_bundle
from palettelink.tools.fuzz_targets import InProcess, OverGrpc
from palettelink.tools.mutator import Mutator, seed_frames


@dataclass
class Report:
    cases: int = 0
    crashes: list[dict[str, Any]] = field(default_factory=list)
    hangs: list[dict[str, Any]] = field(default_factory=list)
    histogram: Counter[str] = field(default_factory=Counter)
    by_operator: dict[str, Counter[str]] = field(default_factory=dict)
    slowest: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    cached: int = 0
    target: str = "in-process"

    def as_dict(self) -> dict[str, Any]:
        return {"cases": self.cases, "crashes": len(self.crashes), "hangs": len(self.hangs),
                "histogram": dict(self.histogram.most_common()), "slowest": self.slowest,
                "seconds": round(self.seconds, 2),
                "cases_per_s": round(self.cases / max(self.seconds, 1e-9), 1),
                "cached": self.cached, "target": self.target,
                "by_operator": {k: dict(v) for k, v in sorted(self.by_operator.items())},
                "crash_cases": self.crashes[:20], "hang_cases": self.hangs[:20]}


class _Worker:
    """Runs cases on one thread so that a hang is noticed (and left behind) instead of waited on."""

    def __init__(self, target: Callable[[bytes], str]) -> None:
        self.target = target
        self.jobs: queue.Queue[bytes] = queue.Queue()
        self.done: queue.Queue[tuple[str, str | None]] = queue.Queue()
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            payload = self.jobs.get()
            try:
                self.done.put((self.target(payload), None))
            except Exception as e:  # noqa: BLE001 - a crash is what we are looking for
                tb = traceback.format_exception(e)
                self.done.put((f"CRASH:{type(e).__name__}", "".join(tb[-3:])[-1500:]))


def fuzz(target: Callable[[bytes], str], mutator: Mutator, cases: int, time_limit: float = 10.0,
         progress: Callable[[int, Report], None] | None = None, save: Path | None = None) -> Report:
    rep = Report()
    worker = _Worker(target)
    t_start = time.perf_counter()
    slowest = -1.0
    for i in range(cases):
        seed_name, op, payload = mutator.case(i)
        t0 = time.perf_counter()
        worker.jobs.put(payload)
        try:
            outcome, tb = worker.done.get(timeout=time_limit)
        except queue.Empty:
            outcome, tb = "hang", None
            worker = _Worker(target)  # the old thread is left to finish (or not) on its own
        dt = time.perf_counter() - t0
        rep.cases += 1
        rep.histogram[outcome] += 1
        rep.by_operator.setdefault(op, Counter())[outcome] += 1
        info = {"case": i, "seed": seed_name, "operator": op, "bytes": len(payload), "outcome": outcome}
        if dt > slowest:
            slowest = dt
            rep.slowest = {**info, "ms": round(dt * 1e3, 1)}
        if outcome == "hang":
            rep.hangs.append(info)
        elif outcome.startswith("CRASH"):
            rep.crashes.append({**info, "traceback": tb})
        if save is not None and (outcome == "hang" or outcome.startswith("CRASH")):
            save.mkdir(parents=True, exist_ok=True)
            (save / f"case-{i}.bin").write_bytes(payload)
        if progress is not None and (i + 1) % 1000 == 0:
            progress(i + 1, rep)
    rep.seconds = time.perf_counter() - t_start
    rep.cached = getattr(target, "cached", 0)
    return rep


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cases", type=int, default=10000, help="cases to run (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the mutator (default 0)")
    p.add_argument("--bundle", default="fall-yolov8", help="bundle name, name/version or folder")
    p.add_argument("--bundles", default=None, help="bundles root (default $PALETTELINK_BUNDLES or ./bundles)")
    p.add_argument("--codec", action="append", default=None, help="only this codec (repeatable)")
    p.add_argument("--server", default=None, metavar="HOST:PORT",
                   help="send every case with Analyze to this server instead of decoding in-process")
    p.add_argument("--token", default=None, help="bearer token for --server")
    p.add_argument("--time-limit", type=float, default=10.0, help="seconds a case may take (default 10)")
    p.add_argument("--skip-network", action="store_true",
                   help="in-process: stop the palette decoder before its decoder network and the "
                        "avif decoder before the bundle's front (faster)")
    p.add_argument("--no-cache", action="store_true", help="in-process: decode every case, even repeats")
    p.add_argument("--no-every-byte", action="store_true", help="skip the cut at every byte of each frame")
    p.add_argument("--save", type=Path, default=None, help="write the payload of every crash/hang here")
    p.add_argument("--json", type=Path, default=None, help="write the report as JSON here")


def run(args: argparse.Namespace) -> int:
    if args.cases < 1 or args.time_limit <= 0:
        print("palettelink fuzz: error: --cases must be ≥ 1 and --time-limit > 0")
        return 2
    side = "edge" if args.server else "server"
    bundle = find_bundle(args.bundle, args.bundles or default_root(), side=side)
    seeds = seed_frames(bundle, args.codec)
    mut = Mutator(seeds, args.seed, every_byte=not args.no_every_byte)
    target: Callable[[bytes], str]
    if args.server:
        target = OverGrpc(args.server, bundle.id, args.token, timeout=args.time_limit)
    else:
        target = InProcess(bundle, skip_network=args.skip_network, cache=not args.no_cache)
    print(f"fuzz: {args.cases} cases over {len(seeds)} frames ({', '.join(s.name for s in seeds)}), "
          f"{'server ' + args.server if args.server else 'in-process'}", flush=True)

    def progress(n: int, rep: Report) -> None:
        print(f"  {n} cases, {len(rep.crashes)} crashes, {len(rep.hangs)} hangs, "
              f"{n / (time.perf_counter() - t0):.0f} cases/s", flush=True)

    t0 = time.perf_counter()
    rep = fuzz(target, mut, args.cases, args.time_limit, progress, args.save)
    rep.target = f"server {args.server}" if args.server else "in-process" + (
        " (no decoder network)" if args.skip_network else "")
    print(format_report(rep))
    if args.json:
        args.json.write_text(json.dumps(rep.as_dict(), indent=2) + "\n")
    return 1 if rep.crashes or rep.hangs else 0


def format_report(rep: Report) -> str:
    lines = [f"cases {rep.cases}  crashes {len(rep.crashes)}  hangs {len(rep.hangs)}  "
             f"{rep.seconds:.1f} s ({rep.cases / max(rep.seconds, 1e-9):.0f} cases/s; {rep.cached} repeats "
             f"answered from the cache)  target: {rep.target}",
             "status histogram:"]
    lines += [f"  {k:<22} {v:>8}" for k, v in rep.histogram.most_common()]
    if rep.slowest:
        s = rep.slowest
        lines.append(f"slowest case: #{s['case']} {s['operator']} on {s['seed']} ({s['bytes']} B) "
                     f"{s['ms']} ms -> {s['outcome']}")
    for c in rep.crashes[:5]:
        lines.append(f"CRASH case #{c['case']} {c['operator']} on {c['seed']}: {c['outcome']}\n"
                     f"{c['traceback']}")
    return "\n".join(lines)
