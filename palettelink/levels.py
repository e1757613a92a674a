"""A bundle's codec levels as its manifest gives them: what ``palettelink info``, the server's
``GetInfo`` and ``/api/info`` show. Reads the manifest and the codec registry only (no ONNX session,
no torch).
"""

from __future__ import annotations

from typing import Any

from palettelink import codecs
from palettelink.bundle import Bundle

_PER_LEVEL = {"level_sizes": "palette_size", "mean_bits": "mean_bits", "mean_bpp": "mean_bpp"}


def _per_level(value: Any, level: int, index: int) -> Any:
    """A per-level number kept beside ``levels``: a list (by position) or a map (by level)."""
    if isinstance(value, dict):
        return value.get(str(level), value.get(level))
    if isinstance(value, list | tuple) and index < len(value):
        return value[index]
    return None


def codec_levels(bundle: Bundle, codec: str) -> list[dict[str, Any]]:
    """Levels of ``codec`` from the manifest: ``{"level": t}`` plus ``palette_size``, ``mean_bits``,
    ``mean_bpp`` where recorded, either inside the level entries or as lists/maps beside them
    (``level_sizes``, ``mean_bits``, ``mean_bpp``). In the manifest's order; where it records none,
    the codec's own levels in ascending order. A codec whose levels have names (avif: ``q30``,
    ``q0/4``) gives each its ``label``."""
    spec = codecs.spec(codec)
    meta = bundle.codecs.get(codec, {})
    levels = meta.get("levels")
    if levels is None:
        levels = sorted(spec.levels(bundle))
    out = []
    for i, lv in enumerate(levels or []):
        d = dict(lv) if isinstance(lv, dict) else {"level": int(lv)}
        for key, name in _PER_LEVEL.items():
            v = _per_level(meta.get(key), int(d["level"]), i)
            if name not in d and v is not None:
                d[name] = v
        if callable(spec.label):
            d.setdefault("label", spec.level_label(int(d["level"])))
        out.append(d)
    return out
