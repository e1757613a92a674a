"""Contexts of the five coding passes (shared with palettelink.train.context, which fits the
tables on the same definitions; the pass layout is in the package docstring)."""

from __future__ import annotations

import numpy as np

from palettelink.codecs.palette.tables import N_NC

# (n, c) → context index: n = same-parent decoded neighbours (0..4), c = count of the mode (1..n)
# (n, c) → context index: n = same-parent decoded neighbours (0..4), c = count of the mode (1..n)
_NC_INDEX = np.zeros((5, 5), dtype=np.int64)
_k = 1
for _n in range(1, 5):
    for _c in range(1, _n + 1):
        _NC_INDEX[_n, _c] = _k
        _k += 1
assert _k == N_NC


def pass_masks(h: int, w: int) -> list[np.ndarray]:
    """[h, w] masks of the passes, in :data:`PASSES` order (module docstring)."""
    y, x = np.arange(h)[:, None], np.arange(w)[None, :]
    y4, x4 = y % 4, x % 4
    return [(y4 == 0) & (x4 == 0), (y4 == 2) & (x4 == 2),
            ((y4 == 0) & (x4 == 2)) | ((y4 == 2) & (x4 == 0)),
            (y % 2 == 1) & (x % 2 == 1), (y + x) % 2 == 1]


_EDGE = ((-1, 0), (1, 0), (0, -1), (0, 1))
_DIAG = ((-1, -1), (-1, 1), (1, -1), (1, 1))


_PAD = 2  # the farthest neighbour a context reads


def _pad(a: np.ndarray) -> np.ndarray:
    """``a`` [G, h, w] with a border of ``_PAD`` -1s (np.pad's result; a tenth of its time on a
    latent this small, where the server's decoder calls it for every pass)."""
    g, h, w = a.shape
    out = np.full((g, h + 2 * _PAD, w + 2 * _PAD), -1, dtype=a.dtype)
    out[:, _PAD : _PAD + h, _PAD : _PAD + w] = a
    return out


def _offsets(shape: tuple[int, ...], pos: tuple[np.ndarray, ...], offsets: tuple[tuple[int, int], ...],
             step: int = 1) -> np.ndarray:
    """Flat indices into a -1-padded map of ``shape`` at ``offsets`` × ``step`` around ``pos`` → [4, n]."""
    g, y, x = pos
    hp, wp = shape[1:]
    base = (g * hp + y + _PAD) * wp + x + _PAD
    return base[None, :] + np.asarray([step * (dy * wp + dx) for dy, dx in offsets])[:, None]


def _around(padded: np.ndarray, pos: tuple[np.ndarray, ...], offsets: tuple[tuple[int, int], ...],
            step: int = 1) -> np.ndarray:
    """Values of a -1-padded map at ``offsets`` × ``step`` around positions ``pos`` → [4, n]."""
    return padded.ravel()[_offsets(padded.shape, pos, offsets, step)]


def anchor_context(parents: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Pass a context at ``mask`` positions: same-parent 4-neighbours + 5 × same-parent diagonals.

    Inside a region of one parent the child is the region's typical one; at a region border it is the
    child nearest the other parent: the counts separate the two cases.
    """
    pos = np.nonzero(mask)
    pp = _pad(parents)
    me = parents[pos]
    n4 = (_around(pp, pos, _EDGE) == me).sum(0)
    nd = (_around(pp, pos, _DIAG) == me).sum(0)
    return (n4 + 5 * nd).astype(np.int64)


def neighbour_context(parents: np.ndarray, ranks: np.ndarray, width: int, mask: np.ndarray,
                      diagonal: bool = False, step: int = 1) -> np.ndarray:
    """Context at ``mask`` positions from 4 already-decoded neighbours (edge or diagonal ones,
    ``step`` apart).

    Among neighbours with the same parent: n (0..4), the mode child rank m (ties → smaller rank) and
    its count c; context = _NC_INDEX[n, c] * width + m (m = 0 when n = 0).
    """
    pos = np.nonzero(mask)
    offs = _DIAG if diagonal else _EDGE
    pp, pr = _pad(parents), _pad(ranks)
    at = _offsets(pp.shape, pos, offs, step)  # [4, n] flat indices, the same in both padded maps
    same = pp.ravel()[at] == parents[pos]
    r = np.where(same, pr.ravel()[at], -1)  # [4, n]
    valid = r >= 0
    n = valid.sum(0)
    cnt = ((r[:, None] == r[None, :]) & valid[None, :]).sum(1) * valid  # [4, n] count of each value
    key = np.where(valid, cnt * (width + 1) - r, -1)
    best = np.argmax(key, axis=0)
    cols = np.arange(r.shape[1])
    m = r[best, cols].clip(min=0)
    c = cnt[best, cols]
    return _NC_INDEX[n, c] * width + m


def pass_context(name: str, parents: np.ndarray, ranks: np.ndarray, width: int, mask: np.ndarray,
                 ) -> np.ndarray:
    """Contexts of pass ``name`` at ``mask`` positions, in C order (ranks need only be valid at
    earlier passes' positions)."""
    if name == "a":
        return anchor_context(parents, mask)
    return neighbour_context(parents, ranks, width, mask, diagonal=name in ("e", "d"),
                             step=2 if name in ("e", "f") else 1)

