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
    ap50_per_class: tuple[float, ...] = ()  # one per ``classes`` entry


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


Matches = list[dict[int, tuple[np.ndarray, np.ndarray, int]]]


def _image_matches(refs: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
                   preds: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], classes: Sequence[int],
                   thresholds: np.ndarray, max_dets: int) -> Matches:
    """Per image and class: its ranked predictions' scores [D], their hits [T,D] and its count of
    reference boxes. Matching never crosses images, so any multiset of images (a bootstrap resample)
    pools these without matching again."""
    out: Matches = []
    for (g_xyxy, g_cls, _), (d_xyxy, d_cls, d_score) in zip(refs, preds, strict=True):
        per: dict[int, tuple[np.ndarray, np.ndarray, int]] = {}
        for c in classes:
            g = g_xyxy[g_cls == c]
            dm = d_cls == c
            order = np.argsort(-d_score[dm], kind="mergesort")[:max_dets]
            d, sc = d_xyxy[dm][order], d_score[dm][order]
            per[c] = (sc, _match(iou_matrix(d, g), thresholds), len(g))
        out.append(per)
    return out


def _pooled_ap(matches: Matches, classes: Sequence[int], images: Iterable[int]) -> list[np.ndarray]:
    """[T] AP per class with reference boxes among ``images`` (indices, repeats allowed), pooled."""
    idx = list(images)
    out = []
    for c in classes:
        n_gt = sum(matches[i][c][2] for i in idx)
        if n_gt == 0:  # undefined for this set of images: left out, as COCO does
            continue
        scores = np.concatenate([matches[i][c][0] for i in idx])
        tps = np.concatenate([matches[i][c][1] for i in idx], axis=1)
        out.append(_ap_from_ranked(scores, tps, n_gt))
    return out


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
    per_class = _pooled_ap(_image_matches(refs, preds, classes, thresholds, max_dets), classes,
                           range(len(refs)))
    n_ref = sum(len(r[1]) for r in refs)
    n_pred = sum(len(p[1]) for p in preds)
    if not per_class:
        nan = math.nan
        return APResult(nan, nan, tuple(nan for _ in thresholds), n_ref, n_pred, ())
    ap = np.mean(np.stack(per_class), axis=0)  # [T], mean over classes with reference boxes
    i50 = int(np.argmin(np.abs(thresholds - 0.5)))
    return APResult(float(ap[i50]), float(ap.mean()), tuple(float(v) for v in ap), n_ref, n_pred,
                    tuple(classes), tuple(float(pc[i50]) for pc in per_class))


@dataclass(frozen=True)
class APInterval:
    """AP50 of one or more prediction sets on the same images, with bootstrap percentile intervals.

    ``difference`` is each set minus the first, resampled *paired* (the same images in every set), so
    it says whether two configurations differ by more than the choice of images: the question an
    int8-versus-fp32 or a codec-versus-codec comparison on 85 pictures asks."""

    ap50: tuple[float, ...]
    interval: tuple[tuple[float, float], ...]
    difference: tuple[tuple[float, float], ...]  # set i minus set 0 (the first is (0, 0))
    level: float
    resamples: int
    strata: int  # groups resampled apart (sources): 1 = the images as one pool


def bootstrap_ap50(references: Sequence[Iterable[BoxLike]],
                   prediction_sets: Sequence[Sequence[Iterable[BoxLike]]], resamples: int = 1000,
                   level: float = 0.95, strata: Sequence[str] | None = None, seed: int = 0,
                   max_dets: int = 100) -> APInterval:
    """Percentile bootstrap of pooled AP50 over images (Efron & Tibshirani 1993, ch. 13).

    Each resample draws the images with replacement, within each stratum where ``strata`` names one
    per image (a source), so every resample keeps the set's mix of sources; every prediction set is
    scored on the same draw. Frames of one video are not independent, so an interval over them is
    narrower than a new camera would show: read it as the uncertainty of *these* pictures, a floor.
    """
    if not 0 < level < 1 or resamples < 1:
        raise ValueError(f"level must be in (0, 1) and resamples ≥ 1, got {level}, {resamples}")
    n = len(references)
    if any(len(p) != n for p in prediction_sets) or (strata is not None and len(strata) != n):
        raise ValueError("every prediction set (and strata) needs one entry per reference image")
    th = np.asarray([0.5])
    refs = [_as_arrays(r) for r in references]
    classes = sorted({int(c) for _, cls, _ in refs for c in cls})
    matches = [_image_matches(refs, [_as_arrays(p) for p in preds], classes, th, max_dets)
               for preds in prediction_sets]

    def ap50(m: Matches, images: Iterable[int]) -> float:
        per_class = _pooled_ap(m, classes, images)
        return float(np.mean([pc[0] for pc in per_class])) if per_class else math.nan

    groups: dict[str, list[int]] = {}
    for i, g in enumerate(strata if strata is not None else [""] * n):
        groups.setdefault(g, []).append(i)
    rng = np.random.default_rng(seed)
    draws = np.empty((resamples, len(matches)))
    for b in range(resamples):
        idx = [int(i) for members in groups.values() for i in rng.choice(members, len(members))]
        draws[b] = [ap50(m, idx) for m in matches]
    q = ((1 - level) / 2 * 100, (1 + level) / 2 * 100)

    def span(x: np.ndarray) -> tuple[float, float]:
        if np.isnan(x).all():  # no reference box in any draw: undefined, as evaluate says
            return math.nan, math.nan
        lo, hi = np.nanpercentile(x, q)
        return float(lo), float(hi)

    return APInterval(tuple(ap50(m, range(n)) for m in matches),
                      tuple(span(draws[:, k]) for k in range(len(matches))),
                      tuple(span(draws[:, k] - draws[:, 0]) for k in range(len(matches))),
                      level, resamples, len(groups))


# COCO's area buckets, in pixels² of the original image
SIZE_BUCKETS = (("small", 0.0, 32.0**2), ("medium", 32.0**2, 96.0**2), ("large", 96.0**2, math.inf))
MISSED = -1  # the "predicted class" of a reference box nothing matched


@dataclass(frozen=True)
class Agreement:
    """What a deployment sees at its score threshold: each reference box is matched (class-agnostic,
    IoU ≥ ``iou``, best IoU first) to at most one prediction; a matched box whose class differs is a
    *confusion* (a pedestrian turned "Fall" is a failure even when the box is right)."""

    recall_by_size: dict[str, float]  # same-class recall per COCO size bucket (NaN: no boxes there)
    n_by_size: dict[str, int]
    confusion: dict[tuple[int, int], int]  # (reference class, predicted class or MISSED) → count
    n_extra: int  # predictions that matched no reference box
    precision: float
    recall: float
    f1: float


def agreement(references: Sequence[Iterable[BoxLike]], predictions: Sequence[Iterable[BoxLike]],
              conf: float = 0.25, iou: float = 0.5) -> Agreement:
    """Per-bucket recall, class confusions and F1 of ``predictions`` (kept at score ≥ ``conf``)."""
    hits = {name: 0 for name, _, _ in SIZE_BUCKETS}
    totals = {name: 0 for name, _, _ in SIZE_BUCKETS}
    confusion: dict[tuple[int, int], int] = {}
    n_extra = n_pred = same = n_ref = 0
    for ref, pred in zip(references, predictions, strict=True):
        g_xyxy, g_cls, _ = _as_arrays(ref)
        d_xyxy, d_cls, d_score = _as_arrays(pred)
        keep = d_score >= conf
        d_xyxy, d_cls = d_xyxy[keep], d_cls[keep]
        n_pred += len(d_cls)
        n_ref += len(g_cls)
        ious = iou_matrix(g_xyxy, d_xyxy)
        match = np.full(len(g_cls), -1)
        taken = np.zeros(len(d_cls), dtype=bool)
        for flat in np.argsort(-ious, axis=None, kind="mergesort"):
            gi, di = divmod(int(flat), max(len(d_cls), 1))
            if ious.size == 0 or ious[gi, di] < iou:
                break
            if match[gi] < 0 and not taken[di]:
                match[gi], taken[di] = di, True
        n_extra += int((~taken).sum())
        areas = (g_xyxy[:, 2] - g_xyxy[:, 0]) * (g_xyxy[:, 3] - g_xyxy[:, 1])
        for gi, c in enumerate(g_cls):
            got = int(d_cls[match[gi]]) if match[gi] >= 0 else MISSED
            confusion[(int(c), got)] = confusion.get((int(c), got), 0) + 1
            ok = got == int(c)
            same += ok
            for name, lo, hi in SIZE_BUCKETS:
                if lo <= areas[gi] < hi:
                    totals[name] += 1
                    hits[name] += ok
    recall = same / n_ref if n_ref else math.nan
    precision = same / n_pred if n_pred else math.nan
    f1 = 2 * precision * recall / (precision + recall) if n_ref and n_pred and precision + recall > 0 else 0.0
    return Agreement({k: hits[k] / totals[k] if totals[k] else math.nan for k in hits}, totals, confusion,
                     n_extra, precision, recall, f1)
