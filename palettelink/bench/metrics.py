"""Where the box scoring used to live: it is :mod:`palettelink.scoring` now (a core module, so the
trainers below the bench score with it too). Kept for the callers that still name this path:
``palettelink/train/curve.py`` and ``levels.py`` (frozen while a training run imports them; see
docs/architecture.md) and ``palettelink/bench/edge_speed.py``. Delete once they import
``palettelink.scoring``.
"""

from palettelink.scoring import (
    IOU_THRESHOLDS,
    MISSED,
    RECALL_POINTS,
    SIZE_BUCKETS,
    Agreement,
    APResult,
    Box,
    BoxLike,
    agreement,
    evaluate,
    iou_matrix,
)

__all__ = ["IOU_THRESHOLDS", "MISSED", "RECALL_POINTS", "SIZE_BUCKETS", "APResult", "Agreement", "Box",
           "BoxLike", "agreement", "evaluate", "iou_matrix"]
