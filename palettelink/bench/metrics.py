"""COCO-style box AP of predictions against reference detections (DESIGN §5: agreement with the
uncompressed pipeline; no human labels are needed).

Follows pycocotools' ``evaluateImg``/``accumulate`` for the "all areas, maxDets=100" setting, so
numbers are comparable with published AP50 / AP50:95:

- class-aware: a prediction only matches a reference box of the same class;
- reference boxes are ground truth, their scores ignored; predictions are ranked by score (stable
  sort, so ties keep their input order, as pycocotools' mergesort does);
- per image and class, each prediction (best score first) takes the unmatched reference box of
  highest IoU ≥ the threshold; at most ``max_dets`` predictions per image and class count;
- precision is made monotone (the envelope from the right) and read at 101 recall points
  0, 0.01, …, 1 (recall points past the last reached recall count as precision 0);
- AP is the mean over classes that have reference boxes (a class with none is undefined and left
  out, as in COCO), and AP50:95 the mean over IoU 0.50:0.05:0.95.

No pycocotools dependency: it is small, and this keeps the benchmark installable offline.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

IOU_THRESHOLDS = np.round(np.linspace(0.5, 0.95, 10), 2)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)


class BoxLike(Protocol):
    """Anything with ``xyxy``, ``class_id`` and ``score`` (e.g. ``palettelink.models.ultra.Detection``)."""

    @property
    def xyxy(self) -> Sequence[float]: ...

    @property
    def class_id(self) -> int: ...

    @property
    def score(self) -> float: ...


@dataclass(frozen=True)
class Box:
    """A plain box, for tests and for results that came over the wire."""

    xyxy: tuple[float, float, float, float]
    class_id: int
    score: float = 1.0


@dataclass(frozen=True)
class APResult:
    ap50: float
    ap50_95: float
    ap_per_iou: tuple[float, ...]  # one per IOU_THRESHOLDS entry
    n_reference: int
    n_predicted: int
    classes: tuple[int, ...]  # classes that had reference boxes (the ones averaged over)


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU between every box of ``a`` [N,4] and ``b`` [M,4] (xyxy, continuous coordinates)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _match(ious: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """``ious`` [D,G] with predictions in rank order → [T,D] bool: matched at each threshold."""
    n_d, n_g = ious.shape
    tp = np.zeros((len(thresholds), n_d), dtype=bool)
    for ti, t in enumerate(thresholds):
        taken = np.zeros(n_g, dtype=bool)
        for d in range(n_d):
            best, m = min(float(t), 1 - 1e-10), -1
            for g in range(n_g):
                if taken[g] or ious[d, g] < best:
                    continue
                best, m = ious[d, g], g
            if m >= 0:
                taken[m] = True
                tp[ti, d] = True
    return tp


def _ap_from_ranked(scores: np.ndarray, tp: np.ndarray, n_gt: int) -> np.ndarray:
    """[T] AP from concatenated per-image results: ``scores`` [D], ``tp`` [T,D]."""
    order = np.argsort(-scores, kind="mergesort")
    tp = tp[:, order]
    tps = np.cumsum(tp, axis=1, dtype=np.float64)
    fps = np.cumsum(~tp, axis=1, dtype=np.float64)
    out = np.zeros(tp.shape[0])
    for ti in range(tp.shape[0]):
        rc = tps[ti] / n_gt
        pr = tps[ti] / np.maximum(tps[ti] + fps[ti], np.spacing(1))
        pr = np.maximum.accumulate(pr[::-1])[::-1]
        idx = np.searchsorted(rc, RECALL_POINTS, side="left")
        q = np.zeros(len(RECALL_POINTS))
        reached = idx < pr.size
        q[reached] = pr[idx[reached]]
        out[ti] = q.mean()
    return out


def _as_arrays(boxes: Iterable[BoxLike]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    bl = list(boxes)
    xyxy = np.array([list(b.xyxy) for b in bl], dtype=np.float64).reshape(-1, 4)
    cls = np.array([int(b.class_id) for b in bl], dtype=np.int64)
    score = np.array([float(b.score) for b in bl], dtype=np.float64)
    return xyxy, cls, score


def evaluate(references: Sequence[Iterable[BoxLike]], predictions: Sequence[Iterable[BoxLike]],
             iou_thresholds: np.ndarray = IOU_THRESHOLDS, max_dets: int = 100) -> APResult:
    """AP of ``predictions[i]`` against ``references[i]`` pooled over all images i.

    Returns NaN APs when no image has a reference box (nothing to agree with).
    """
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} reference images but {len(predictions)} prediction images")
    thresholds = np.asarray(iou_thresholds, dtype=np.float64)
    refs = [_as_arrays(r) for r in references]
    preds = [_as_arrays(p) for p in predictions]
    classes = sorted({int(c) for _, cls, _ in refs for c in cls})
    per_class = []
    for c in classes:
        n_gt = 0
        scores: list[np.ndarray] = []
        tps: list[np.ndarray] = []
        for (g_xyxy, g_cls, _), (d_xyxy, d_cls, d_score) in zip(refs, preds, strict=True):
            g = g_xyxy[g_cls == c]
            dm = d_cls == c
            d, s = d_xyxy[dm], d_score[dm]
            order = np.argsort(-s, kind="mergesort")[:max_dets]
            d, s = d[order], s[order]
            n_gt += len(g)
            scores.append(s)
            tps.append(_match(iou_matrix(d, g), thresholds))
        per_class.append(_ap_from_ranked(np.concatenate(scores), np.concatenate(tps, axis=1), n_gt))
    n_ref = sum(len(r[1]) for r in refs)
    n_pred = sum(len(p[1]) for p in preds)
    if not per_class:
        nan = math.nan
        return APResult(nan, nan, tuple(nan for _ in thresholds), n_ref, n_pred, ())
    ap = np.mean(np.stack(per_class), axis=0)  # [T], mean over classes with reference boxes
    i50 = int(np.argmin(np.abs(thresholds - 0.5)))
    return APResult(float(ap[i50]), float(ap.mean()), tuple(float(v) for v in ap), n_ref, n_pred,
                    tuple(classes))
