"""The encoder's whole stream in a few array operations: every layer's contexts at once.

:func:`palettelink.codecs.palette.stream.encode_layer` codes one layer pass by pass, as the decoder
must (each pass's contexts read the ranks decoded by the passes before it). The encoder knows every
rank before it codes, and each pass's contexts read only positions of earlier passes (package
docstring), so it can compute the contexts of all passes of all layers together and hand constriction
one call per layer. The bytes are the same as :func:`encode_layer`'s, layer for layer
(``tests/test_palette_batch.py`` compares them on random palettes and shapes; the golden streams
re-encode through this path):

- one gather of a per-(group, finest entry) table gives, for every level, each position's parent id,
  its rank among the parent's children and whether that parent has ≥ 2 children (coded at all);
- each pass's positions form one or two strided sub-lattices (y, x mod 4 or mod 2), so a neighbour is
  a shifted strided view of a padded map, never a gather;
- the neighbour context (same-parent count n, mode rank m and its count c over four neighbours) is a
  lookup in a table over the 4 neighbours' (rank + 1) digits, built once from the same definition
  (:func:`~palettelink.codecs.palette.context.neighbour_context`'s tie rule included);
- the symbols of a layer are taken in coding order (pass, group, y, x) through one cached
  permutation, their table rows from one float64 copy per level of that level's pass tables.

A segment-by-segment ``encode_reverse`` and one call over the concatenated segments push the same
symbols with the same models in the same order (ANS is a stack), hence the same words.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from palettelink import entropy
from palettelink.codecs.palette.context import _NC_INDEX
from palettelink.codecs.palette.tables import N_A, N_NC, PASSES, PaletteTables

_EDGE = ((-1, 0), (1, 0), (0, -1), (0, 1))
_DIAG = ((-1, -1), (-1, 1), (1, -1), (1, 1))
# pass → (its sub-lattices as (y0, x0, step), the neighbours its context reads, their distance);
# the same layout as context.pass_masks / pass_context
LATTICES: dict[str, tuple[tuple[tuple[int, int, int], ...], tuple[tuple[int, int], ...], int]] = {
    "a": (((0, 0, 4),), _EDGE, 1),
    "e": (((2, 2, 4),), _DIAG, 2),
    "f": (((0, 2, 4), (2, 0, 4)), _EDGE, 2),
    "d": (((1, 1, 2),), _DIAG, 1),
    "b": (((0, 1, 2), (1, 0, 2)), _EDGE, 1),
}
_PAD = 2  # the farthest neighbour a context reads
_MAX_LUT = 1 << 22  # (widest sibling set + 1)**4 entries at most; wider palettes code layer by layer
_SCALE = 1.0 / (1 << entropy.PROB_BITS)  # rows sum to 2**16: x / 2**16 is exact, like _probs' division


def supported(tb: PaletteTables) -> bool:
    """Whether this palette's sibling sets are narrow enough for the lookup table (all trained ones)."""
    return (max(tb.width(t) for t in range(tb.n_levels)) + 1) ** 4 <= _MAX_LUT


def _mode_table(wmax: int) -> tuple[np.ndarray, np.ndarray]:
    """For code = Σ_i (r_i + 1)·(wmax + 1)^i over four neighbour ranks r_i (−1: absent or another
    parent): the (n, c) context index and the mode rank m, by neighbour_context's own rule."""
    b = wmax + 1
    codes = np.arange(b**4)
    r = np.stack([(codes // b**i) % b for i in range(4)]) - 1  # [4, N]
    valid = r >= 0
    n = valid.sum(0)
    cnt = ((r[:, None] == r[None, :]) & valid[None, :]).sum(1) * valid
    key = np.where(valid, cnt * (wmax + 1) - r, -1)
    best = np.argmax(key, axis=0)[None]
    m = np.take_along_axis(r, best, 0)[0].clip(min=0)
    c = np.take_along_axis(cnt, best, 0)[0]
    return _NC_INDEX[n, c].astype(np.int64), m.astype(np.int64)


class _Cache:
    """What a PaletteTables needs for batch coding, derived once (kept on the tables object)."""

    def __init__(self, tb: PaletteTables) -> None:
        n_l, g_n, k0 = tb.n_levels, tb.n_groups, int(tb.sizes[0])
        self.dtype = np.int16 if k0 < 1 << 15 else np.int32
        # [L, 3, G*K0]: per level, per (group, finest entry): parent id at t+1 (root: 0), rank among
        # the parent's children, parent has ≥ 2 children
        per = np.zeros((n_l, 3, g_n, k0), self.dtype)
        gi = np.arange(g_n)[:, None]
        for t in range(n_l):
            ids = tb.ancestor[:, t]
            par = tb.ancestor[:, t + 1] if t + 1 < n_l else np.zeros_like(ids)
            per[t, 0], per[t, 1], per[t, 2] = par, tb.rank[t][gi, ids], tb.nch[t][gi, par] > 1
        self.per = per.reshape(n_l, 3, g_n * k0)
        self.width = np.array([tb.width(t) for t in range(n_l)], np.int64)
        self.kpar = np.array([tb.nch[t].shape[1] for t in range(n_l)], np.int64)
        self.base = int(self.width.max()) + 1
        self.code_dtype = np.int16 if self.base**4 < 1 << 15 else np.int32
        self.lut_nc, self.lut_m = _mode_table(self.base - 1)
        # per level: the neighbour context itself, nc · M_t + m, for every code
        self.lut_ctx = self.lut_nc[None, :] * self.width[:, None] + self.lut_m[None, :]  # [L, base**4]
        self.probs: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
        self.orders: dict[tuple[int, int, int], np.ndarray] = {}

    def level_probs(self, tb: PaletteTables, model: str, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Level t's tables as one float64 [rows, M_t] array (static: one table; context: the five
        pass tables one after the other) and the first row of each pass."""
        key = (model, t)
        if key not in self.probs:
            if model == "static":
                flat = [tb.static[t].reshape(-1, tb.static[t].shape[-1])]
                off = np.zeros(len(PASSES), np.int64)
            else:
                tabs = [tb.ctx[p][t] for p in PASSES]  # type: ignore[index]
                flat = [x.reshape(-1, x.shape[-1]) for x in tabs]
                off = np.cumsum([0] + [len(f) for f in flat[:-1]]).astype(np.int64)
            ints = np.concatenate(flat)
            sums = ints.sum(-1, keepdims=True)
            probs = ints * _SCALE if (sums == 1 << entropy.PROB_BITS).all() else ints / sums
            self.probs[key] = (np.ascontiguousarray(probs, np.float64), off)
        return self.probs[key]

    def rows_of(self, tb: PaletteTables, model: str, t: int, rows: np.ndarray) -> np.ndarray:
        """Level t's probability rows ``rows`` ([n, M_t] float64): each row taken as one opaque item
        (a void view), several times faster than 2-D fancy indexing, same values."""
        probs = self.level_probs(tb, model, t)[0]
        width = probs.shape[1]
        items = probs.view(np.dtype((np.void, 8 * width))).reshape(-1)
        return np.take(items, rows).view(np.float64).reshape(-1, width)

    def pass_of(self, h: int, w: int) -> np.ndarray:
        """[h, w]: the pass each position is coded in."""
        key = (0, h, w)
        if key not in self.orders:
            pass_of = np.empty((h, w), np.int64)
            for k, name in enumerate(PASSES):
                for y0, x0, step in LATTICES[name][0]:
                    pass_of[y0::step, x0::step] = k
            self.orders[key] = pass_of
        return self.orders[key]

    def order(self, g_n: int, h: int, w: int) -> np.ndarray:
        """Flat positions of a [G, h, w] map in coding order: pass, then group, y, x."""
        key = (g_n, h, w)
        if key not in self.orders:
            pass_of = self.pass_of(h, w)
            self.orders[key] = np.argsort(np.broadcast_to(pass_of, (g_n, h, w)).ravel(), kind="stable")
        return self.orders[key]


    def flat_order(self, n_t: int, g_n: int, h: int, w: int) -> np.ndarray:
        """:meth:`order` for ``n_t`` stacked maps: [T, G*h*w] flat positions, map by map."""
        key = (-n_t, g_n, h, w)
        if key not in self.orders:
            self.orders[key] = np.arange(n_t)[:, None] * (g_n * h * w) + self.order(g_n, h, w)[None]
        return self.orders[key]


def _cache(tb: PaletteTables) -> _Cache:
    c = tb.__dict__.get("_batch_cache")
    if c is None:
        c = tb.__dict__["_batch_cache"] = _Cache(tb)
    return c


def _shifted(a: np.ndarray, dy: int, dx: int, y0: int, x0: int, step: int, ny: int, nx: int,
             dist: int) -> np.ndarray:
    """The padded maps ``a`` [T, G, h + 4, w + 4] at the ny × nx lattice positions (y0 + step·i,
    x0 + step·j), each moved by (dy, dx) × dist: a strided view, no copy."""
    ys, xs = _PAD + y0 + dy * dist, _PAD + x0 + dx * dist
    return a[:, :, ys: ys + step * (ny - 1) + 1: step, xs: xs + step * (nx - 1) + 1: step]


def encode_layers(tb: PaletteTables, finest: np.ndarray, levels: Sequence[int], model: str) -> list[bytes]:
    """The layers of ``levels`` (any levels, in the order given) of finest index maps [G, h, w]
    (validated by the caller), under ``model`` (checked by the caller): each byte-identical to
    ``encode_layer(tb, t, ids_at(t), ids_at(t + 1), model)``."""
    if not len(levels):
        return []
    c = _cache(tb)
    g_n, h, w = finest.shape
    ts = np.asarray(levels, np.int64)
    n_t, ghw, k0 = len(ts), g_n * h * w, int(tb.sizes[0])
    flat_fin = (np.arange(g_n)[:, None, None] * k0 + finest).ravel()
    allp = np.take(c.per[ts].reshape(n_t * 3, g_n * k0), flat_fin, axis=1).reshape(n_t, 3, g_n, h, w)
    ranks = allp[:, 1]
    shape = (n_t, g_n, h + 2 * _PAD, w + 2 * _PAD)
    parents = np.full(shape, -1, c.dtype)  # -1 outside the map: never anyone's parent
    parents[:, :, _PAD:-_PAD, _PAD:-_PAD] = allp[:, 0]
    rank1 = np.zeros(shape, c.code_dtype)  # rank + 1; 0 outside the map
    rank1[:, :, _PAD:-_PAD, _PAD:-_PAD] = ranks + 1
    width = c.width[ts][:, None, None, None]
    gk = np.arange(g_n)[None, :, None, None] * c.kpar[ts][:, None, None, None]  # group's first row
    offs = np.stack([c.level_probs(tb, model, int(t))[1] for t in ts])  # [T, passes]
    rows = np.empty((n_t, g_n, h, w), np.int64)  # every position's row in its level's probs
    lut = c.lut_ctx[ts].reshape(-1)  # the levels' context tables one after the other
    lut_base = (np.arange(n_t) * c.lut_ctx.shape[1])[:, None, None, None]
    for k, name in enumerate(PASSES):
        off = offs[:, k][:, None, None, None]
        _pass_rows(c, name, model, parents, rank1, rows, h, w, gk, width, off, lut, lut_base)
    order, flat_order = c.order(g_n, h, w), c.flat_order(n_t, g_n, h, w)
    coded = np.take(allp[:, 2].reshape(n_t, ghw), order, axis=1).astype(bool)  # [T, GHW], coding order
    pick = flat_order[coded]
    symbols = np.take(ranks.reshape(-1), pick).astype(np.int32)
    picked_rows = np.take(rows.reshape(-1), pick)
    bounds = np.concatenate([[0], np.cumsum(coded.sum(1))])
    layers = []
    for i, t in enumerate(ts):
        a, b = int(bounds[i]), int(bounds[i + 1])
        coder = entropy.AnsCoder()
        if b > a:
            probs = c.rows_of(tb, model, int(t), picked_rows[a:b])
            coder.encode_reverse(symbols[a:b], entropy.ROW_MODEL, probs)
        layers.append(entropy.words_to_bytes(coder.get_compressed()))
    return layers


def _pass_rows(c: _Cache, name: str, model: str, parents: np.ndarray, rank1: np.ndarray, out: np.ndarray,
               h: int, w: int, gk: np.ndarray, width: int | np.ndarray, off: int | np.ndarray,
               lut: np.ndarray, lut_base: int | np.ndarray = 0) -> None:
    """Table rows of pass ``name``'s positions into ``out`` [T, G, h, w] from padded ``parents`` and
    ``rank1`` (rank + 1; 0 where unknown). One arithmetic for both sides: the encoder knows every rank
    and runs all levels at once (``width``, ``off``, ``lut_base`` per level, broadcast over [T, 1, 1, 1];
    ``lut`` the levels' context tables one after the other); the decoder runs one level, pass by pass,
    with the ranks of the passes before (scalars, ``lut`` that level's table)."""
    lattices, neighbours, dist = LATTICES[name]
    for y0, x0, step in lattices:
        ny, nx = len(range(y0, h, step)), len(range(x0, w, step))
        if not ny or not nx:
            continue
        lattice = (y0, x0, step, ny, nx, dist)

        def view(a: np.ndarray, dy: int, dx: int, lattice: tuple[int, ...] = lattice) -> np.ndarray:
            return _shifted(a, dy, dx, *lattice)

        par = view(parents, 0, 0)
        rows = out[:, :, y0::step, x0::step]
        if model == "static":
            rows[...] = gk + par + off
        elif name == "a":
            n4 = sum(((view(parents, dy, dx) == par).astype(np.int64) for dy, dx in _EDGE),
                     np.zeros(par.shape, np.int64))
            nd = sum(((view(parents, dy, dx) == par).astype(np.int64) for dy, dx in _DIAG),
                     np.zeros(par.shape, np.int64))
            rows[...] = (gk + par) * N_A + n4 + 5 * nd + off
        else:
            code = np.zeros(par.shape, c.code_dtype)
            for i, (dy, dx) in enumerate(neighbours):
                same = view(parents, dy, dx) == par
                code += same * view(rank1, dy, dx) * c.code_dtype(c.base**i)
            rows[...] = (gk + par) * (N_NC * width) + np.take(lut, code + lut_base) + off


def decode_layer(tb: PaletteTables, t: int, data: bytes, parents: np.ndarray, model: str) -> np.ndarray:
    """Level-t ids [G, h, w] of one layer given level t+1's ids ``parents`` (the root: zeros), model
    checked by the caller: the same symbols as :func:`palettelink.codecs.palette.stream.decode_layer`
    (pass by pass, each pass's rows from the ranks of the passes before it), with the encoder's
    strided-view contexts, lookup table and float64 probability rows instead of a gather per
    neighbour and a table division per pass. Malformed data → InvalidStream."""
    from palettelink.errors import InvalidStream

    c = _cache(tb)
    g_n, h, w = parents.shape
    gi = np.arange(g_n)[:, None, None]
    shape = (1, g_n, h + 2 * _PAD, w + 2 * _PAD)
    padded = np.full(shape, -1, c.dtype)  # -1 outside the map: never anyone's parent
    padded[0, :, _PAD:-_PAD, _PAD:-_PAD] = parents
    rank1 = np.zeros(shape, c.code_dtype)  # rank + 1; 0 outside the map
    inner = rank1[0, :, _PAD:-_PAD, _PAD:-_PAD]
    inner[...] = 1  # rank 0 until decoded (a position read before its pass never is)
    nch = tb.nch[t][gi, parents]
    coded = nch > 1
    pass_of = c.pass_of(h, w)
    offs = c.level_probs(tb, model, t)[1]
    gk = (np.arange(g_n) * c.kpar[t])[None, :, None, None]
    lut = c.lut_ctx[t]
    rows = np.empty((1, g_n, h, w), np.int64)
    ranks = np.zeros((g_n, h, w), np.int64)
    try:
        coder = entropy.RowDecoder(data)
        for k, name in enumerate(PASSES):
            sel = coded & (pass_of == k)[None]
            if not sel.any():
                continue
            _pass_rows(c, name, model, padded, rank1, rows, h, w, gk, int(c.width[t]), int(offs[k]), lut)
            sym = coder.take_probs(c.rows_of(tb, model, t, rows[0][sel])).astype(np.int64)
            if (sym >= nch[sel]).any():
                raise InvalidStream("it decodes to a child that does not exist (corrupt)")
            ranks[sel] = sym
            inner[sel] = (sym + 1).astype(c.code_dtype)
        coder.finish()
    except InvalidStream as e:
        raise InvalidStream(f"layer for level {t}: {e}") from e
    return tb.child[t][gi, parents, ranks]


def cache_info(tb: PaletteTables) -> dict[str, Any]:
    """What the batch coder holds for ``tables`` (sizes in bytes), for the bench and tests."""
    c = tb.__dict__.get("_batch_cache")
    if c is None:
        return {"built": False}
    return {"built": True, "lookup_entries": int(c.lut_nc.size),
            "probs_bytes": int(sum(p.nbytes for p, _ in c.probs.values())), "per_bytes": int(c.per.nbytes)}
