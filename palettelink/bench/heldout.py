"""The leave-source-out set of one bundle's codec: every known source that codec never trained on.

The feature codec's evaluation set (:func:`palettelink.train.data.eval_sources`) is held out from
*that* codec's training; another codec was trained on other sources (the image codec of
``vision-image`` saw the first 58 % of ``vtest.avi``, which the feature codec never did, and never
saw the gcompris photos the feature codec trained on). So a bundle's set is derived from its own
training record (``codec/training.json``, installed by ``build-bundle``): every source the project
knows (:func:`data.eval_sources` and :func:`data.training_sources`, the gathered corpus included) is
a candidate, and a source is **left out whole** when any of its files is a file the codec trained on,
matched by path or by file name (a video's frames are one source: a camera seen in training is
never evaluated, not even its later minutes). Pictures reserved for independent checks
(docs/EVALUATION.md) are in no candidate source; they are refused here again by name and path.

``keep`` (optional) filters items before that: ``bench-tasks --objects-only`` keeps the pictures in
which an uncompressed task model finds something (a box, a person or a face), so a CPU budget is spent
on pictures with something to agree on; the choice sees the original picture only, never a codec's.
``per_source`` then keeps at most that many items of each source, evenly spread over its sorted
items, so one large collection does not drown the others.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from palettelink.bundle import Bundle
from palettelink.errors import InvalidRequest

TRAINING_RECORD = "codec/training.json"  # where build-bundle installs the codec's training record


def _file_of(key: str) -> str:
    """A training-record item ("path" or "video path#frame") → its file's path."""
    return key.rsplit("#", 1)[0] if "#" in key and key.rsplit("#", 1)[1].isdigit() else key


def trained_files(bundle: Bundle) -> set[str]:
    """Paths of every file the bundle's codec trained on (a video once); refused when the bundle
    carries no training record (then nothing can be said about what is held out)."""
    if TRAINING_RECORD not in bundle.manifest.get("files", {}):
        raise InvalidRequest(f"bundle {bundle.id} carries no {TRAINING_RECORD}: its codec's training "
                             "sources are unknown, so no set can be called held out")
    record = json.loads(bundle.file(TRAINING_RECORD).read_text())
    items = record.get("train_items")
    if not isinstance(items, list) or not items:
        raise InvalidRequest(f"bundle {bundle.id}: {TRAINING_RECORD} lists no training items")
    return {_file_of(str(k)) for k in items}


def training_items(bundle: Bundle) -> list[Any]:
    """The items the bundle's codec trained on that exist on this machine (a path, or a video path and
    frame index), in the record's order: what a calibration may use without touching held-out data."""
    record = json.loads(bundle.file(TRAINING_RECORD).read_text()) if TRAINING_RECORD in \
        bundle.manifest.get("files", {}) else {}
    out: list[Any] = []
    for key in record.get("train_items") or []:
        key = str(key)
        path = Path(_file_of(key))
        if path.is_file():
            out.append((path, int(key.rsplit("#", 1)[1])) if str(path) != key else path)
    return out


def _path(item: Any) -> Path:
    return Path(item[0] if isinstance(item, tuple) else item)


def reserved(item: Any) -> bool:
    """A picture reserved for independent checks (never used): by name, or the HTML documentation."""
    from palettelink.train.corpus import RESERVED_NAMES

    p = _path(item)
    return p.name in RESERVED_NAMES or "/html/" in str(p)


@dataclass
class HeldOut:
    """The set: items by source, and every candidate source left out with the reason."""

    sources: dict[str, list[Any]]
    left_out: dict[str, str] = field(default_factory=dict)
    filtered: dict[str, int] = field(default_factory=dict)  # source → items ``keep`` refused

    def items(self) -> list[Any]:
        from palettelink.train import data

        return sorted((i for v in self.sources.values() for i in v), key=data.item_key)

    def describe(self) -> dict[str, Any]:
        return {"sources": {k: len(v) for k, v in self.sources.items()}, "left_out": dict(self.left_out),
                "filtered_out": dict(self.filtered)}


def held_out(bundle: Bundle, per_source: int | None = None,
             keep: Callable[[Any], bool] | None = None) -> HeldOut:
    """Every known source none of whose files ``bundle``'s codec trained on (see the module doc)."""
    from palettelink.train import data

    trained = trained_files(bundle)
    trained_names = {Path(f).name for f in trained}
    candidates: dict[str, list[Any]] = {}
    for src in (data.eval_sources(), data.training_sources()):
        for name, items in src.items():
            candidates.setdefault(name, list(items))
    out = HeldOut({})
    for name, items in sorted(candidates.items()):
        files = {str(_path(i)) for i in items}
        seen = sorted(f for f in files if f in trained or Path(f).name in trained_names)
        if seen:
            out.left_out[name.split(" (")[0]] = (f"the codec trained on {len(seen)} of its file(s), "
                                                 f"e.g. {Path(seen[0]).name}")
            continue
        kept = [i for i in items if not reserved(i)]
        if len(kept) < len(items):
            out.left_out[f"{name}: {len(items) - len(kept)} reserved picture(s)"] = \
                "reserved for independent checks"
        if keep is not None:
            n = len(kept)
            kept = [i for i in kept if keep(i)]
            if len(kept) < n:
                out.filtered[name] = n - len(kept)
        if per_source is not None and len(kept) > per_source:
            at = np.unique(np.linspace(0, len(kept) - 1, per_source).round().astype(int))
            kept = [kept[int(k)] for k in at]
        if kept:
            out.sources[name] = kept
    if not out.sources:
        raise InvalidRequest(f"no source is held out from bundle {bundle.id}'s codec (left out: "
                             f"{', '.join(out.left_out) or 'none known'})")
    return out
