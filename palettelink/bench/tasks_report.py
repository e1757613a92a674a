"""What a ``bench-tasks`` report says, as markdown: the lowest bpp at 0.9 and 0.95 agreement per task
and codec, the verdict of issue 16 (does the palette image codec beat AVIF, downscaled AVIF included?)
and every row. The same text goes to ``bench-tasks.md`` beside the JSON and, between two markers, into
the README (:func:`sync_readme`), so the README's table is regenerated from the committed JSON, never
typed (``palettelink bench-tasks --render JSON --readme README.md``; a test keeps them equal).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from palettelink.bench.task_scores import ADAPTERS
from palettelink.errors import InvalidRequest

FRACS = (0.9, 0.95)
HEADLINE = {task: a.headline for task, a in ADAPTERS.items()}
SCORE_NAME = {"detect": "detect AP50", "segment": "segment mIoU", "landmarks": "landmarks ok@0.05",
              "pose": "pose OKS"}
AVIF_FAMILY = ("avif-codec", "avif", "avif-down2", "avif-down4")  # "AVIF, downscaled included"
# issue 16's bar: (task, agreement) the palette image codec must reach at a lower bpp than any AVIF row
BAR = (("detect", 0.9), ("pose", 0.95))
SEGMENT_BAR = 0.9  # ... and segment mIoU at some level
PALETTE = "palette"
MARK = "bench-tasks"


def lowest_bpp(rows: list[dict[str, Any]], task: str, frac: float) -> dict[str, dict[str, Any]]:
    """Per method: the row of lowest bpp whose headline score for ``task`` is ≥ ``frac``."""
    key = HEADLINE[task]
    per: dict[str, dict[str, Any]] = {}
    for r in rows:
        v = (r.get(task) or {}).get(key)
        if v is None or v != v or v < frac:
            continue
        if r["method"] not in per or r["bpp"] < per[r["method"]]["bpp"]:
            per[r["method"]] = {"bpp": round(float(r["bpp"]), 4), "label": r["label"],
                                key: round(float(v), 4)}
    return per


def verdict(report: dict[str, Any]) -> dict[str, Any]:
    """Issue 16's test on this report: for each bar, the palette codec's lowest bpp against the lowest
    of the AVIF rows (the codec's, the anchor's, the downscaled anchors'); segment: whether any palette
    level reaches mIoU ``SEGMENT_BAR``. ``palette_wins``: every bar met. ``default``: the codec the
    image bundle should default to by this measurement."""
    rows, tasks = report["rows"], report["tasks"]
    out: dict[str, Any] = {"bars": []}
    wins = True
    for task, frac in BAR:
        if task not in tasks:
            continue
        per = lowest_bpp(rows, task, frac)
        pal = per.get(PALETTE)
        avif = min((dict(v, method=m) for m, v in per.items() if m in AVIF_FAMILY), key=lambda v: v["bpp"],
                   default=None)
        ok = pal is not None and (avif is None or pal["bpp"] < avif["bpp"])
        wins &= ok
        out["bars"].append({"task": task, "agreement": frac, "palette": pal, "best_avif": avif, "met": ok})
    if "segment" in tasks:
        best = max((r["segment"]["iou"] for r in rows if r["method"] == PALETTE
                    and r["segment"]["iou"] == r["segment"]["iou"]), default=float("nan"))
        ok = best >= SEGMENT_BAR
        wins &= ok
        out["bars"].append({"task": "segment", "agreement": SEGMENT_BAR, "palette_best": round(best, 4),
                            "met": bool(ok)})
    out["palette_wins"] = bool(wins)
    out["default"] = PALETTE if wins else "avif"
    return out


def _cell(v: dict[str, Any] | None) -> str:
    return "never" if v is None else f"{v['bpp']:.3f} ({v['label']})"


def lowest_table(report: dict[str, Any]) -> str:
    methods = list(dict.fromkeys(r["method"] for r in report["rows"]))
    lines = ["| task | agreement | " + " | ".join(methods) + " |",
             "|---|---:|" + "---:|" * len(methods)]
    for t in report["tasks"]:
        for frac in FRACS:
            per = lowest_bpp(report["rows"], t, frac)
            lines.append(f"| {SCORE_NAME[t]} | ≥ {frac:g} | " + " | ".join(_cell(per.get(m)) for m in methods)
                         + " |")
    return "\n".join(lines)


def rows_table(report: dict[str, Any]) -> str:
    tasks = report["tasks"]
    lines = ["| codec | point | bpp | PSNR dB | MS-SSIM | " + " | ".join(SCORE_NAME[t] for t in tasks) + " |",
             "|---|---|---:|---:|---:|" + "---:|" * len(tasks)]
    for r in report["rows"]:
        cells = [f"{r[t][HEADLINE[t]]:.3f}" for t in tasks]
        lines.append(f"| {r['method']} | {r['label']} | {r['bpp']:.3f} | {r['psnr']:.2f} | "
                     f"{r['msssim']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict_text(report: dict[str, Any]) -> str:
    v = verdict(report)
    lines = []
    for b in v["bars"]:
        name = SCORE_NAME[b["task"]]
        if b["task"] == "segment" and "palette_best" in b:
            lines.append(f"- {name} ≥ {b['agreement']:g} at some palette level: "
                         f"{'**met**' if b['met'] else '**not met**'} "
                         f"(best palette level: {b['palette_best']:.3f})")
            continue
        avif = b["best_avif"]
        lines.append(f"- {name} ≥ {b['agreement']:g} at a lower bpp than AVIF (downscaled included): "
                     f"{'**met**' if b['met'] else '**not met**'} (palette {_cell(b['palette'])}; best AVIF "
                     + ("never" if avif is None else f"{avif['method']} {_cell(avif)}") + ")")
    stays = "; the palette image codec stays selectable (`--codec palette`)"
    lines.append(f"- So the image bundle's default codec is **{v['default']}**"
                 + ("" if v["palette_wins"] else stays) + ".")
    return "\n".join(lines)


def summary(report: dict[str, Any]) -> str:
    refs = report.get("reference_counts", {})
    srcs = report.get("sources") or {}
    parts = [f"{len(report['images'])} images"]
    if srcs:
        parts.append(f"{len(srcs)} sources (" + ", ".join(f"{k} {n}" for k, n in srcs.items()) + ")")
    names = {"detect": "reference boxes", "pose": "reference people", "landmarks": "reference faces"}
    parts += [f"{refs[t]} {n}" for t, n in names.items() if refs.get(t) is not None]
    return "; ".join(parts)


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown (bench-tasks.md and the README block)."""
    chosen = []
    if report.get("objects_only"):
        chosen.append("pictures in which an uncompressed task model finds a box, a person or a face")
    if report.get("per_source"):
        chosen.append(f"at most {report['per_source']} per source, evenly spread")
    if report.get("max_side"):
        chosen.append(f"shrunk to at most {report['max_side']} px on the longer side")
    out = [f"`{report['bundle']}`, {report.get('set', 'the images given')}"
           + (f" ({'; '.join(chosen)})" if chosen else "") + f": {summary(report)}. Reference: "
           f"{report['reference']}.", ""]
    if report.get("left_out"):
        out += ["Left out (the codec trained on them, or reserved): "
                + "; ".join(f"{k} ({v})" for k, v in report["left_out"].items()) + ".", ""]
    out += ["Lowest bpp at which each codec keeps the agreement (`never`: no point of it does):", "",
            lowest_table(report), "", verdict_text(report), ""]
    return "\n".join(out)


def full_markdown(report: dict[str, Any]) -> str:
    return markdown(report) + "\nEvery point:\n\n" + rows_table(report) + "\n"


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- {MARK}:{name} start (generated from the committed JSON; do not edit) -->", \
        f"<!-- {MARK}:{name} end -->"


def sync_readme(readme: Path, report: dict[str, Any], name: str, write: bool = True) -> bool:
    """Put :func:`markdown` between the README's two markers for ``name``; → whether it changed.
    The markers must be there already (where the table goes is the README's choice)."""
    start, end = _markers(name)
    text = readme.read_text()
    pat = re.compile(re.escape(start) + r"\n.*?" + re.escape(end), re.S)
    if not pat.search(text):
        raise InvalidRequest(f"{readme}: no '{start}' … '{end}' block to regenerate")
    new = pat.sub(lambda _: f"{start}\n{markdown(report)}{end}", text, count=1)
    if write and new != text:
        readme.write_text(new)
    return new != text


def best_points(rows: list[dict[str, Any]], tasks: Sequence[str], frac: float = 0.95) -> dict[str, Any]:
    """Per task and method: the lowest bpp whose headline score is ≥ ``frac`` (of the uncompressed
    pipeline's, which is 1 by construction for agreement scores)."""
    return {t: lowest_bpp(rows, t, frac) for t in tasks}


def format_table(rows: list[dict[str, Any]], tasks: Sequence[str]) -> str:
    mw = max([8, *(len(r["method"]) for r in rows)])
    head = f"{'method':<{mw}} {'point':>6} {'bpp':>7} {'PSNR':>6} {'MS-SSIM':>7}"
    cols = {"detect": ("ap50", "AP50"), "segment": ("iou", "mIoU"), "landmarks": ("nme", "NME"),
            "pose": ("oks", "OKS")}
    for t in tasks:
        head += f" {cols[t][1]:>7}"
    if "detect" in tasks:
        head += f" {'AP50:95':>7}"
    if "landmarks" in tasks:
        head += f" {'lm@.05':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        line = f"{r['method']:<{mw}} {r['label']:>6} {r['bpp']:7.3f} {r['psnr']:6.2f} {r['msssim']:7.4f}"
        for t in tasks:
            line += f" {r[t][cols[t][0]]:7.3f}"
        if "detect" in tasks:
            line += f" {r['detect']['ap50_95']:7.3f}"
        if "landmarks" in tasks:
            line += f" {r['landmarks']['success_at_0.05']:7.3f}"
        lines.append(line)
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], tasks: Sequence[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("psnr", "PSNR (dB)"), ("msssim", "MS-SSIM")] + [(t, f"{t}: {HEADLINE[t]}")
                                                               for t in tasks]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        for m in dict.fromkeys(r["method"] for r in rows):
            pts = sorted((r["bpp"], r[key] if key in ("psnr", "msssim") else r[key][HEADLINE[key]])
                         for r in rows if r["method"] == m)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=m, ms=3)
        ax.set_xscale("log")
        ax.set_xlabel("bpp")
        ax.set_title(label, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
