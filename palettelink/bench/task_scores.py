"""The scores of ``palettelink bench-tasks``: one adapter per task from a zoo model's result to what
its metric takes, and the metrics themselves (agreement with the model on the uncompressed picture:
box AP50, pooled mask IoU, landmark NME / success at 0.05, pose OKS with COCO sigmas, PSNR/MS-SSIM).
Kept apart from the runner so the int8 generator's check (:mod:`palettelink.bench.int8_decoder`)
scores with the same code without loading the benchmark."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from palettelink import scoring

TASKS = ("detect", "segment", "landmarks", "pose")
# mediapipe face mesh: outer eye corners (the inter-ocular distance of NME)
EYE_CORNERS = (33, 263)
COCO_SIGMAS = np.array([.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87, .89,
                        .89]) / 10.0


# --------------------------------------------------------------------------------------------------
# metrics (each takes per-image references and predictions as the zoo's result objects)


def mask_iou(refs: Sequence[np.ndarray], preds: Sequence[np.ndarray]) -> float:
    inter = sum(int(np.logical_and(r, p).sum()) for r, p in zip(refs, preds, strict=True))
    union = sum(int(np.logical_or(r, p).sum()) for r, p in zip(refs, preds, strict=True))
    return float("nan") if union == 0 else inter / union


def _box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    ua = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / ua if ua > 0 else 0.0


def landmark_nme(refs: Sequence[Sequence[Any]], preds: Sequence[Sequence[Any]], ok: float = 0.05
                 ) -> tuple[float, float, int]:
    """(mean NME of matched faces, success rate, reference faces). Faces are (box, points [N, ≥2])."""
    errs, hits, n = [], 0, 0
    for ref, pred in zip(refs, preds, strict=True):
        for rbox, rpts in ref:
            n += 1
            best = max(pred, key=lambda f: _box_iou(rbox, f[0]), default=None)
            if best is None or _box_iou(rbox, best[0]) < 0.3:
                continue
            r, p = np.asarray(rpts)[:, :2], np.asarray(best[1])[:, :2]
            iod = float(np.linalg.norm(r[EYE_CORNERS[0]] - r[EYE_CORNERS[1]])) if len(r) > 263 else \
                float(np.hypot(rbox[2] - rbox[0], rbox[3] - rbox[1]))
            e = float(np.linalg.norm(r - p, axis=1).mean()) / max(iod, 1e-6)
            errs.append(e)
            hits += e <= ok
    return (float(np.mean(errs)) if errs else float("nan")), (hits / n if n else float("nan")), n


def oks(ref_kps: np.ndarray, pred_kps: np.ndarray, area: float, vis: float = 0.3) -> float:
    """COCO object keypoint similarity; reference keypoints below ``vis`` score do not count."""
    r, p = np.asarray(ref_kps), np.asarray(pred_kps)
    keep = r[:, 2] >= vis
    if not keep.any():
        return float("nan")
    d2 = ((r[:, :2] - p[:, :2]) ** 2).sum(1)
    k2 = (2 * COCO_SIGMAS) ** 2
    return float(np.exp(-d2 / (2 * max(area, 1.0) * k2))[keep].mean())


def pose_oks(refs: Sequence[Sequence[Any]], preds: Sequence[Sequence[Any]]) -> tuple[float, float, int]:
    """(mean OKS, fraction with OKS ≥ 0.5, reference persons); persons are (box, keypoints [17, 3])."""
    vals = []
    for ref, pred in zip(refs, preds, strict=True):
        for rbox, rk in ref:
            area = (rbox[2] - rbox[0]) * (rbox[3] - rbox[1])
            scores = [oks(rk, pk, area) for _, pk in pred]
            scores = [s for s in scores if s == s]
            if oks(rk, rk, area) != oks(rk, rk, area):  # no visible reference keypoint: not scored
                continue
            vals.append(max(scores, default=0.0))
    if not vals:
        return float("nan"), float("nan"), 0
    return float(np.mean(vals)), float(np.mean(np.asarray(vals) >= 0.5)), len(vals)


def picture_quality(rgb: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(PSNR dB, MS-SSIM) of ``rgb`` against ``ref`` (both HxWx3 uint8, same size)."""
    import torch
    from pytorch_msssim import ms_ssim

    a, b = rgb.astype(np.float64), ref.astype(np.float64)
    mse = float(np.mean((a - b) ** 2))
    psnr = 99.0 if mse == 0 else 10 * math.log10(255.0**2 / mse)
    ta = torch.from_numpy(rgb.transpose(2, 0, 1)[None].astype(np.float32))
    tb = torch.from_numpy(ref.transpose(2, 0, 1)[None].astype(np.float32))
    small = min(rgb.shape[:2]) <= 160  # five scales need > 160 px with the 11-px window
    ms = float(ms_ssim(ta, tb, data_range=255.0, win_size=7 if small else 11))
    return psnr, ms


# --------------------------------------------------------------------------------------------------
# task adapters: the zoo model's result → what the metrics take


@dataclass
class TaskAdapter:
    predict: Callable[[Any, np.ndarray, bool], Any]  # (zoo model, rgb, is_reference) → per-image result
    score: Callable[[list[Any], list[Any]], dict[str, float]]
    headline: str  # the key of ``score`` that "fraction of uncompressed" uses


REF_CONF, PRED_CONF = 0.3, 0.05  # reference boxes as the server reports them; predictions ranked for AP


def _boxes(model: Any, rgb: np.ndarray, ref: bool) -> list[scoring.Box]:
    dets = model.run(rgb, score_threshold=REF_CONF if ref else PRED_CONF).detections
    return [scoring.Box(tuple(float(v) for v in d.xyxy), int(d.class_id), float(d.score))  # type: ignore[arg-type]
            for d in dets]


def _score_detect(refs: list[Any], preds: list[Any]) -> dict[str, float]:
    r = scoring.evaluate(refs, preds)
    return {"ap50": r.ap50, "ap50_95": r.ap50_95, "n_reference": r.n_reference}


def _mask(model: Any, rgb: np.ndarray, ref: bool) -> np.ndarray:
    return np.asarray(model.run(rgb).mask, bool)


def _faces(model: Any, rgb: np.ndarray, ref: bool) -> list[tuple[tuple[float, ...], np.ndarray]]:
    return [(tuple(float(v) for v in f.box), np.asarray(f.points)) for f in model.run(rgb).faces]


def _score_landmarks(refs: list[Any], preds: list[Any]) -> dict[str, float]:
    nme, rate, n = landmark_nme(refs, preds)
    return {"nme": nme, "success_at_0.05": rate, "n_reference": n}


def _people(model: Any, rgb: np.ndarray, ref: bool) -> list[tuple[tuple[float, ...], np.ndarray]]:
    return [(tuple(float(v) for v in p.box), np.asarray(p.keypoints)) for p in model.run(rgb).people]


def _score_pose(refs: list[Any], preds: list[Any]) -> dict[str, float]:
    m, frac, n = pose_oks(refs, preds)
    return {"oks": m, "oks_at_0.5": frac, "n_reference": n}


ADAPTERS: dict[str, TaskAdapter] = {
    "detect": TaskAdapter(_boxes, _score_detect, "ap50"),
    "segment": TaskAdapter(_mask, lambda r, p: {"iou": mask_iou(r, p)}, "iou"),
    "landmarks": TaskAdapter(_faces, _score_landmarks, "success_at_0.05"),
    "pose": TaskAdapter(_people, _score_pose, "oks"),
}
