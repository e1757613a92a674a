"""What a trained palette codec measured about itself, recorded in its codec.json (and so in the
bundle's manifest): which levels it offers, its default level, and how novel a frame may look before
the edge falls back to a finer level.

Why: a level that gives *less* accuracy than a coarser one, or that makes the detector fire where the
uncompressed features do not, is a trap for a user who trusts "finer is better"; and "level 0 is the
default" was the worst choice the first codec could make (AP50 0.45 at level 0 vs 0.95 at level 5 on
its own eval). So the pipeline measures every level on a calibration set of *training* sources (plain
views: what the codec sees at run time; never the leave-source-out evaluation set) against the
uncompressed detector and against AVIF at its lowest quality, then:

- **offered levels**: walking from the coarsest level to the finest, a level is kept when its false
  boxes per image are no more than AVIF q0's and its AP50 is at least the last kept (coarser) level's
  minus ``tolerance`` (0.02), so accuracy never drops as a user asks for more bits. If fewer than two
  levels keep AVIF q0's false-box rate, the accuracy rule alone chooses and the record says the
  false-box rule did not hold (one level for every budget would end the codec's scalability);
- **default level**: the coarsest offered level whose AP50 is within ``tolerance`` of the best
  offered level's: the best accuracy the codec has, at the fewest bits;
- **novelty threshold**: novelty is the mean squared distance per channel from each latent vector to
  its nearest finest-palette entry (what ``edge.onnx`` outputs as ``novelty``); the threshold is the
  99th percentile over the calibration views. A frame above it lies outside what the palette learned.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

NOVELTY_QUANTILE = 0.99
TOLERANCE = 0.02


def novelty_of(latents: np.ndarray, tables: Mapping[str, np.ndarray]) -> np.ndarray:
    """Per image [N]: mean over positions and channels of the squared distance from each group's
    latent vector to its nearest finest-palette entry (in the palette's search space). The torch
    twin is ``export.EdgeGraph``; both compute ‖v‖² + ‖s‖² − 2·v·s."""
    bounds = np.asarray(tables["groups"]).astype(int)
    n = latents.shape[0]
    per_group = []
    for g in range(len(bounds) - 1):
        a, b = int(bounds[g]), int(bounds[g + 1])
        v = np.moveaxis(latents[:, a:b], 1, -1).reshape(n, -1, b - a).astype(np.float64)
        if f"g{g}_embed_w" in tables:
            v = v @ np.asarray(tables[f"g{g}_embed_w"], np.float64).T + np.asarray(tables[f"g{g}_embed_b"])
        s = np.asarray(tables[f"g{g}_search"], np.float64)
        d = (v ** 2).sum(-1, keepdims=True) + (s ** 2).sum(-1)[None, None] - 2.0 * v @ s.T
        per_group.append(np.maximum(d.min(-1), 0.0).mean(-1) / v.shape[-1])
    return np.mean(per_group, axis=0)


def calibrate_novelty(latents: np.ndarray, tables: Mapping[str, np.ndarray]) -> dict[str, float]:
    nov = novelty_of(latents, tables)
    return {"threshold": float(np.quantile(nov, NOVELTY_QUANTILE)), "quantile": NOVELTY_QUANTILE,
            "p50": float(np.quantile(nov, 0.5)), "p95": float(np.quantile(nov, 0.95)),
            "max": float(nov.max()), "n": int(len(nov)),
            "unit": "mean squared distance per latent channel to the nearest finest-palette entry"}


def choose_levels(per_level: Sequence[dict[str, float]], avif_extra_per_image: float,
                  tolerance: float = TOLERANCE) -> tuple[list[int], int, bool]:
    """(offered levels finest first, default level, whether the false-box rule held) from each
    level's ``ap50`` and ``extra_per_image`` (index = level, 0 finest). See the module docstring.

    When fewer than two levels pass the false-box rule, the bundle would lose its scalability (one
    level left for every budget); the levels are then chosen by the accuracy rule alone and the third
    value is False, so the manifest and the report say that no level keeps AVIF q0's false-box rate."""
    def pick(check_extras: bool) -> list[int]:
        offered: list[int] = []
        last_ap = -1.0
        for lv in range(len(per_level) - 1, -1, -1):
            r = per_level[lv]
            if check_extras and r["extra_per_image"] > avif_extra_per_image:
                continue
            if r["ap50"] >= last_ap - tolerance:
                offered.append(lv)
                last_ap = max(last_ap, r["ap50"])
        return sorted(offered)

    offered, held = pick(True), True
    if len(offered) < 2:
        offered, held = pick(False), False
    best = max(per_level[lv]["ap50"] for lv in offered)
    default = max(lv for lv in offered if per_level[lv]["ap50"] >= best - tolerance)
    return offered, default, held


def _avif_q0(rgb: np.ndarray) -> np.ndarray:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="AVIF", quality=0)
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        return np.asarray(im.convert("RGB"))


def measure_levels(det: Any, enc: Any, dec: Any, quantise_fn: Any, n_levels: int, size: int,
                   views: Sequence[tuple[list[Any], Any, np.ndarray]], ref_conf: float = 0.25,
                   pred_conf: float = 0.001, progress: bool = True) -> dict[str, Any]:
    """AP50 and false boxes per image of every level, of the unquantised z and of AVIF q0, on
    ``views`` = (crossing tensors [torch], letterbox, original RGB) against the uncompressed
    detector. Returns {"levels": [...], "unquantised": {...}, "avif_q0": {...}, "n_images",
    "reference_boxes"}."""
    import torch
    from tqdm import tqdm

    from palettelink.image import letterbox
    from palettelink.scoring import agreement, evaluate

    refs: list[Any] = []
    preds: dict[str, list[Any]] = {k: [] for k in ["unquantised", "avif_q0", *map(str, range(n_levels))]}
    with torch.inference_mode():
        for ts, lb, rgb in tqdm(views, desc="measure levels", unit="img", disable=not progress):
            refs.append(det.postprocess(det.tail(ts), lb, conf=ref_conf))
            z = enc(ts)
            preds["unquantised"].append(det.postprocess(det.tail(dec(z, None)), lb, conf=pred_conf))
            for lv in range(n_levels):
                out = dec(quantise_fn(z, lv).to(z.dtype), lv)
                preds[str(lv)].append(det.postprocess(det.tail(out), lb, conf=pred_conf))
            x, alb = letterbox(_avif_q0(rgb), size)
            preds["avif_q0"].append(det.detect_image(x, alb, conf=pred_conf))

    def score(p: list[Any]) -> dict[str, float]:
        ap = evaluate(refs, p)
        ag = agreement(refs, p, conf=ref_conf)
        return {"ap50": round(float(ap.ap50), 4), "extra_per_image": round(ag.n_extra / max(1, len(refs)), 3)}

    return {"levels": [score(preds[str(lv)]) for lv in range(n_levels)],
            "unquantised": score(preds["unquantised"]), "avif_q0": score(preds["avif_q0"]),
            "n_images": len(refs), "reference_boxes": int(sum(len(r) for r in refs))}


def level_report(det: Any, enc: Any, dec: Any, quantise_fn: Any, tables: Mapping[str, np.ndarray],
                 cache: Any, latents: np.ndarray, n_calibration: int = 80,
                 progress: bool = True) -> dict[str, Any]:
    """The ``levels`` stage's measurements: every level on the plain views of ``n_calibration``
    training items spread over the cache, and novelty calibrated on every plain view. The choice of
    offered and default levels is derived from them (:func:`choose_levels`) where it is recorded."""
    from palettelink.train.data import load_all_rgb

    per_item = cache.augment + 1
    n_items = len(cache) // per_item
    pick = sorted({int(i) for i in np.linspace(0, n_items - 1, min(n_calibration, n_items))})
    rgbs = load_all_rgb([cache.items[i] for i in pick])
    views = []
    for i, rgb in zip(pick, rgbs, strict=True):
        ts = cache.batch([i * per_item])
        views.append(([t.float() for t in ts], cache.letterbox(i * per_item), rgb))
    n_levels = int(np.asarray(tables["level_sizes"]).size)
    measured = measure_levels(det, enc, dec, quantise_fn, n_levels, cache.size, views, progress=progress)
    plain = latents[::per_item]
    return {"calibration": {"items": len(pick), "reference_boxes": measured["reference_boxes"],
                            "set": "plain views of training items (never the evaluation sources)"},
            "measured": measured, "novelty": calibrate_novelty(plain, tables), "tolerance": TOLERANCE}
