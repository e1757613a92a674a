"""COCO-style AP on hand-made cases whose answers are worked out by hand (101-point interpolation)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from palettelink.scoring import Box, evaluate, iou_matrix

A = (0.0, 0.0, 10.0, 10.0)
B = (20.0, 20.0, 30.0, 30.0)
C = (50.0, 50.0, 60.0, 70.0)


def test_iou_matrix() -> None:
    m = iou_matrix(np.array([A, A]), np.array([A, (5.0, 0.0, 15.0, 10.0), B]))
    assert m.shape == (2, 3)
    assert m[0, 0] == 1.0 and m[0, 1] == pytest.approx(50 / 150) and m[0, 2] == 0.0
    assert iou_matrix(np.zeros((0, 4)), np.array([A])).shape == (0, 1)
    assert iou_matrix(np.array([(0, 0, 0, 0)]), np.array([(0, 0, 0, 0)]))[0, 0] == 0.0  # no NaN


def test_identical_detections_score_one() -> None:
    refs = [[Box(A, 0, 0.9), Box(B, 1, 0.3)], [Box(C, 0, 0.5)]]
    r = evaluate(refs, refs)
    assert (r.ap50, r.ap50_95) == (1.0, 1.0) and r.n_reference == 3 and r.classes == (0, 1)


def test_reference_scores_are_ignored_and_predictions_ranked() -> None:
    # The reference's scores do not matter; only the predictions' ranking does.
    refs = [[Box(A, 0, 0.01), Box(B, 0, 0.01)]]
    assert evaluate(refs, [[Box(B, 0, 0.2), Box(A, 0, 0.9)]]).ap50 == 1.0


def test_nothing_predicted_scores_zero() -> None:
    r = evaluate([[Box(A, 0)]], [[]])
    assert r.ap50 == 0.0 and r.ap50_95 == 0.0


def test_false_positive_ranked_first_halves_precision() -> None:
    # FP (0.9) then TP (0.8): precision 0.5 at recall 1; the envelope gives 0.5 at all 101 points.
    r = evaluate([[Box(A, 0)]], [[Box(B, 0, 0.9), Box(A, 0, 0.8)]])
    assert r.ap50 == pytest.approx(0.5)
    # Ranked last it costs nothing: precision is 1 up to recall 1.
    assert evaluate([[Box(A, 0)]], [[Box(A, 0, 0.9), Box(B, 0, 0.1)]]).ap50 == 1.0


def test_half_recall() -> None:
    # One of two reference boxes found: recall points 0..0.5 (51 of 101) have precision 1.
    r = evaluate([[Box(A, 0), Box(B, 0)]], [[Box(A, 0, 0.9)]])
    assert r.ap50 == pytest.approx(51 / 101)


def test_class_aware() -> None:
    r = evaluate([[Box(A, 0)]], [[Box(A, 1, 0.9)]])
    assert r.ap50 == 0.0  # right place, wrong class: class 0 missed; class 1 has no reference (ignored)
    # Mean over the classes that have reference boxes: class 0 perfect, class 1 missed.
    assert evaluate([[Box(A, 0), Box(B, 1)]], [[Box(A, 0, 0.9)]]).ap50 == pytest.approx(0.5)


def test_iou_thresholds_give_ap50_95() -> None:
    # IoU 0.7 exactly: a match at thresholds 0.50..0.70 (5 of 10), a miss above.
    shifted = (0.0, 0.0, 10.0, 7.0)
    assert iou_matrix(np.array([shifted]), np.array([A]))[0, 0] == pytest.approx(0.7)
    r = evaluate([[Box(A, 0)]], [[Box(shifted, 0, 0.9)]])
    assert r.ap50 == 1.0 and r.ap50_95 == pytest.approx(0.5)
    assert r.ap_per_iou[:5] == (1.0,) * 5 and r.ap_per_iou[5:] == (0.0,) * 5


def test_one_prediction_matches_one_reference() -> None:
    # Two predictions on one reference box: the second is a false positive (duplicate).
    r = evaluate([[Box(A, 0)]], [[Box(A, 0, 0.9), Box(A, 0, 0.8)]])
    assert r.ap50 == 1.0  # the duplicate is ranked after full recall
    r = evaluate([[Box(A, 0), Box(B, 0)]], [[Box(A, 0, 0.9), Box(A, 0, 0.8), Box(B, 0, 0.7)]])
    # ranks: TP, FP, TP → precision 1 for recall ≤ 0.5, 2/3 above: (51·1 + 50·2/3) / 101
    assert r.ap50 == pytest.approx((51 + 50 * 2 / 3) / 101)


def test_best_iou_match_and_pooling_over_images() -> None:
    # The high-score prediction overlaps both reference boxes but takes the better one, leaving
    # the other for the second prediction; pooling sorts scores across images.
    left, right = (0.0, 0.0, 10.0, 10.0), (2.0, 0.0, 12.0, 10.0)
    refs = [[Box(left, 0), Box(right, 0)], [Box(C, 0)]]
    preds = [[Box((1.8, 0.0, 11.8, 10.0), 0, 0.9), Box(left, 0, 0.5)], [Box(C, 0, 0.7)]]
    assert evaluate(refs, preds).ap50 == 1.0
    # A miss in image 2 ranked between the hits of image 1: TP(0.9), FP(0.7), TP(0.5) of 3 refs.
    preds2 = [[Box((1.8, 0.0, 11.8, 10.0), 0, 0.9), Box(left, 0, 0.5)], [Box(B, 0, 0.7)]]
    r = evaluate(refs, preds2)
    # recall 1/3 @ p 1, 2/3 @ p 2/3; points r ≤ 1/3 (0..0.33: 34) get 1, 0.34..0.66 (33) get 2/3
    assert r.ap50 == pytest.approx((34 + 33 * 2 / 3) / 101)


def test_no_reference_boxes_is_undefined_not_perfect() -> None:
    r = evaluate([[]], [[Box(A, 0, 0.9)]])
    assert math.isnan(r.ap50) and math.isnan(r.ap50_95) and r.n_predicted == 1


def test_max_dets_per_image_and_class() -> None:
    refs = [[Box(A, 0)]]
    junk = [Box(B, 0, 0.9)] * 3 + [Box(A, 0, 0.1)]
    assert evaluate(refs, [junk], max_dets=3).ap50 == 0.0  # the true hit is cut off
    assert evaluate(refs, [junk]).ap50 == pytest.approx(0.25)


def test_mismatched_lengths() -> None:
    with pytest.raises(ValueError):
        evaluate([[]], [])


def test_agreement_counts_sizes_flips_misses_and_extras() -> None:
    """A small box found with its class, a large one found as the other class (a flip, not a hit),
    a medium one missed, and one prediction matching nothing."""
    from palettelink.scoring import MISSED, agreement

    ref = [Box((0, 0, 20, 20), 0), Box((100, 100, 300, 300), 1), Box((400, 400, 450, 450), 0)]
    pred = [Box((1, 1, 20, 20), 0, 0.9), Box((100, 100, 300, 290), 0, 0.8), Box((600, 0, 700, 50), 1, 0.7),
            Box((400, 400, 450, 450), 0, 0.1)]  # below the threshold: does not count
    a = agreement([ref], [pred], conf=0.25)
    assert a.n_by_size == {"small": 1, "medium": 1, "large": 1}
    assert a.recall_by_size == {"small": 1.0, "medium": 0.0, "large": 0.0}
    assert a.confusion == {(0, 0): 1, (1, 0): 1, (0, MISSED): 1}
    assert a.n_extra == 1
    assert a.recall == pytest.approx(1 / 3) and a.precision == pytest.approx(1 / 3)
    assert a.f1 == pytest.approx(1 / 3)


def test_the_old_import_path_is_the_core_scoring() -> None:
    """``palettelink.bench.metrics`` re-exports :mod:`palettelink.scoring` until its last callers move."""
    from palettelink import scoring
    from palettelink.bench import metrics

    assert all(getattr(metrics, n) is getattr(scoring, n) for n in metrics.__all__)


def _scene(hit: bool) -> list[Box]:
    return [Box(A, 0, 0.9)] if hit else [Box(B, 0, 0.9)]


def test_the_bootstrap_interval_holds_the_estimate_and_a_set_agrees_with_itself() -> None:
    """Ten images, one box each; one set finds 8, another 6. The point estimates are evaluate's, each
    interval holds its estimate, a set minus itself is exactly 0 on every resample, and the paired
    difference of the two is negative throughout where the second never finds what the first misses."""
    from palettelink.scoring import bootstrap_ap50

    refs = [[Box(A, 0)] for _ in range(10)]
    eight = [_scene(i < 8) for i in range(10)]
    six = [_scene(i < 6) for i in range(10)]
    r = bootstrap_ap50(refs, [eight, eight, six], resamples=300, seed=1)
    assert r.ap50 == pytest.approx((evaluate(refs, eight).ap50, evaluate(refs, eight).ap50,
                                    evaluate(refs, six).ap50))
    for est, (lo, hi) in zip(r.ap50, r.interval, strict=True):
        assert lo <= est <= hi and lo < hi  # the images vary, so the interval has width
    assert r.difference[0] == (0.0, 0.0) and r.difference[1] == (0.0, 0.0)
    lo, hi = r.difference[2]
    assert hi <= 0 and lo < -0.05
    again = bootstrap_ap50(refs, [eight, six], resamples=300, seed=1)  # the same draws, the same answer
    assert again.interval == (r.interval[0], r.interval[2])


def test_a_stratified_bootstrap_keeps_each_sources_share() -> None:
    """Two sources: one always right, one always wrong. Resampled within each source, every draw keeps
    five of each, so AP50 is the same on every draw; pooled, the draws vary."""
    from palettelink.scoring import bootstrap_ap50

    refs = [[Box(A, 0)] for _ in range(10)]
    preds = [_scene(i < 5) for i in range(10)]
    strata = ["good"] * 5 + ["bad"] * 5
    kept = bootstrap_ap50(refs, [preds], resamples=200, strata=strata)
    assert kept.strata == 2 and kept.interval[0][0] == kept.interval[0][1] == pytest.approx(kept.ap50[0])
    pooled = bootstrap_ap50(refs, [preds], resamples=200)
    assert pooled.strata == 1 and pooled.interval[0][0] < pooled.ap50[0] < pooled.interval[0][1]
    with pytest.raises(ValueError):
        bootstrap_ap50(refs, [preds], strata=strata[:3])
