"""Backward-diffusion entropy models frozen as integer tables (DESIGN §1.6, "Hence the codec" 4).

Fits the ``ctx_*`` arrays that :mod:`palettelink.codecs.palette` reads (layout in its docstring):

- ``ctx_static_t{t}`` [G, K_{t+1}, M_t]: p(child rank | group, parent), the static fallback;
- ``ctx_a_t{t}`` [G, K_{t+1}, N_A, M_t]: anchors, conditioned on the parent map's neighbourhood;
- ``ctx_b_t{t}`` [G, K_{t+1}, N_NC·M_t, M_t]: the rest, conditioned also on the decoded anchor
  neighbours (mode child among same-parent neighbours, its count, their number);
- ``ctx_info`` int32 [4]: format, N_A, N_NC, 0.

Every (parent, context) cell has few samples, so each table is a Dirichlet-smoothed count table that
backs off to a *parametric* model shared by all parents of a level:

    static   p_s(r | P)        = (N(P, r) + α / nch(P)) / (N(P) + α)
    anchors  q_A(r | P, a)     ∝ p_s(r | P) ** γ_a                       (sharpen inside regions)
    others   q_B(r | P, n,c,m) ∝ p_s(r | P) ** γ_nc · exp(δ_nc [r = m])  (copy the neighbours' child)
    final    p(r | P, ctx)     = (N(P, ctx, r) + β · q(r | P, ctx)) / (N(P, ctx) + β)

γ, δ (a few numbers per level: the "tiny network" over the discrete contexts) are fitted by maximum
likelihood in torch; α and β by held-out code length (the last fifth of the training maps), then
everything is refitted on all maps. Probabilities become integer rows with
``entropy.normalise_counts`` once, here; decoders only ever see the integers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from palettelink import entropy
from palettelink.codecs.palette import (
    CTX_FORMAT,
    N_A,
    N_NC,
    PaletteTables,
    anchor_context,
    anchors_mask,
    nonanchor_context,
)

ALPHAS = (0.25, 1.0, 4.0)
BETAS = (1.0, 4.0, 16.0, 64.0, 256.0)
SCALE = 1 << 20  # float probabilities → integer counts before normalise_counts


@dataclass
class LevelData:
    """Coded symbols of one refinement level t over many maps: group, parent, context, rank."""

    g_a: np.ndarray
    p_a: np.ndarray
    c_a: np.ndarray
    r_a: np.ndarray
    g_b: np.ndarray
    p_b: np.ndarray
    c_b: np.ndarray
    r_b: np.ndarray

    def static_view(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (np.concatenate([self.g_a, self.g_b]), np.concatenate([self.p_a, self.p_b]),
                np.concatenate([self.r_a, self.r_b]))


def as_maps(maps: np.ndarray | Sequence[np.ndarray], n_groups: int) -> np.ndarray:
    """[N, G, h, w], from that or from one [N, h, w] array per group."""
    if isinstance(maps, list | tuple):
        return np.stack([np.asarray(m) for m in maps], axis=1).astype(np.int64)
    m = np.asarray(maps).astype(np.int64)
    if m.ndim == 3:
        m = m[None]
    if m.shape[1] != n_groups:
        raise ValueError(f"index maps must be [N, {n_groups}, h, w], got {m.shape}")
    return m


def level_data(tb: PaletteTables, maps: np.ndarray, t: int) -> LevelData:
    """Gather every coded symbol of level t (positions whose parent has ≥ 2 children)."""
    parts: dict[str, list[np.ndarray]] = {k: [] for k in LevelData.__dataclass_fields__}
    gi = np.arange(tb.n_groups)[:, None, None]
    width = tb.width(t)
    for fin in maps:
        ids = tb.ids_at(fin, t)
        par = tb.ids_at(fin, t + 1) if t + 1 < tb.n_levels else np.zeros_like(ids)
        ranks = tb.rank[t][gi, ids]
        multi = tb.nch[t][gi, par] > 1
        anch = anchors_mask(*ids.shape[1:])[None]
        gg = np.broadcast_to(gi, ids.shape)
        ca, cb = anchor_context(par), nonanchor_context(par, ranks, width)
        for suffix, mask, ctx in (("a", multi & anch, ca), ("b", multi & ~anch, cb)):
            parts[f"g_{suffix}"].append(gg[mask])
            parts[f"p_{suffix}"].append(par[mask])
            parts[f"c_{suffix}"].append(ctx[mask])
            parts[f"r_{suffix}"].append(ranks[mask])
    return LevelData(**{k: np.concatenate(v).astype(np.int64) for k, v in parts.items()})


def _valid(tb: PaletteTables, t: int) -> np.ndarray:
    """[G, K_{t+1}, M_t] True where the rank is a real child."""
    return np.arange(tb.width(t))[None, None, :] < tb.nch[t][..., None]


def _counts(shape: tuple[int, ...], idx: tuple[np.ndarray, ...]) -> np.ndarray:
    flat = np.ravel_multi_index(idx, shape)
    return np.bincount(flat, minlength=int(np.prod(shape))).reshape(shape).astype(np.float64)


def static_probs(tb: PaletteTables, t: int, d: LevelData, alpha: float) -> np.ndarray:
    """p_s [G, K_{t+1}, M_t] (zero outside the real children)."""
    valid = _valid(tb, t)
    g, p, r = d.static_view()
    n = _counts(valid.shape, (g, p, r))
    prior = valid / np.maximum(tb.nch[t][..., None], 1)
    return (n + alpha * prior) / (n.sum(-1, keepdims=True) + alpha) * valid


def _backoff_a(ps: np.ndarray, gamma: np.ndarray) -> np.ndarray:
    """q_A [G, K, N_A, M] ∝ p_s ** γ_a."""
    logp = np.log(np.where(ps > 0, ps, 1.0))[:, :, None, :]
    q = np.exp(gamma[None, None, :, None] * logp) * (ps > 0)[:, :, None, :]
    return q / q.sum(-1, keepdims=True)


def _backoff_b(ps: np.ndarray, gamma: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """q_B [G, K, N_NC*M, M] ∝ p_s ** γ_nc · exp(δ_nc [r = m])."""
    g_n, k, m = ps.shape
    logp = np.log(np.where(ps > 0, ps, 1.0))
    nc = np.repeat(np.arange(N_NC), m)  # context index → (nc, m)
    mm = np.tile(np.arange(m), N_NC)
    logit = gamma[nc][None, None, :, None] * logp[:, :, None, :]
    logit = logit + delta[nc][None, None, :, None] * (np.arange(m)[None, :] == mm[:, None])[None, None]
    logit = np.where((ps > 0)[:, :, None, :], logit, -np.inf)
    logit -= logit.max(-1, keepdims=True)
    q = np.exp(logit)
    return q / q.sum(-1, keepdims=True)


def fit_shape(ps: np.ndarray, na: np.ndarray, nb: np.ndarray, steps: int = 40,
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fit γ_A [N_A], γ_B [N_NC], δ_B [N_NC] by maximum likelihood (torch, LBFGS).

    The likelihood only needs the count tables ``na`` [G, K, N_A, M] and ``nb`` [G, K, N_NC·M, M]
    (sufficient statistics), so a fit takes milliseconds whatever the number of maps.
    """
    import torch

    width = ps.shape[-1]
    ga = torch.ones(N_A, dtype=torch.float64, requires_grad=True)
    gb = torch.ones(N_NC, dtype=torch.float64, requires_grad=True)
    db = torch.zeros(N_NC, dtype=torch.float64, requires_grad=True)
    logp = np.log(np.where(ps > 0, ps, 1.0))
    # only the (group, parent, context) rows that occur: a few thousand, whatever the data size
    ra = np.nonzero(na.sum(-1))
    rb = np.nonzero(nb.sum(-1))
    lpa, oka = torch.from_numpy(logp[ra[:2]]), torch.from_numpy(ps[ra[:2]] > 0)
    lpb, okb = torch.from_numpy(logp[rb[:2]]), torch.from_numpy(ps[rb[:2]] > 0)
    ca, cb = torch.from_numpy(ra[2]), torch.from_numpy(rb[2])
    ta, tb_ = torch.from_numpy(na[ra]), torch.from_numpy(nb[rb])
    match = (torch.arange(width)[None, :] == (cb % width)[:, None]).double()
    ncb = cb // width
    total = max(1.0, float(na.sum() + nb.sum()))

    def logsm(z: torch.Tensor) -> torch.Tensor:
        m = z.detach().amax(-1, keepdim=True)
        e = torch.where(torch.isfinite(z), torch.exp(z - m), 0.0)
        return z - m - torch.log(e.sum(-1, keepdim=True))

    def nll() -> torch.Tensor:
        la = (ga[ca][:, None] * lpa).masked_fill(~oka, -torch.inf)
        lb = (gb[ncb][:, None] * lpb + db[ncb][:, None] * match).masked_fill(~okb, -torch.inf)
        sa = torch.where(ta > 0, logsm(la), 0.0)
        sb = torch.where(tb_ > 0, logsm(lb), 0.0)
        return -((ta * sa).sum() + (tb_ * sb).sum()) / total

    opt = torch.optim.LBFGS([ga, gb, db], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nll()
        loss.backward()
        return loss

    opt.step(closure)
    return (ga.detach().numpy().clip(0.0, 8.0), gb.detach().numpy().clip(0.0, 8.0),
            db.detach().numpy().clip(-8.0, 16.0))


def smoothed(counts: np.ndarray, prior: np.ndarray, beta: float) -> np.ndarray:
    return (counts + beta * prior) / (counts.sum(-1, keepdims=True) + beta)


def to_rows(p: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Float probabilities → integer rows summing to 2**16 (≥ 1 each), the frozen form."""
    c = np.rint(np.where(valid, p, 0.0) * SCALE).astype(np.int64)
    rows = entropy.normalise_counts(c)
    return rows.astype(np.uint16 if rows.max() < 1 << 16 else np.int32)


def _bits(rows: np.ndarray, idx: tuple[np.ndarray, ...], r: np.ndarray) -> float:
    """Ideal code length (bits) of symbols ``r`` under integer ``rows[idx]``."""
    if not len(r):
        return 0.0
    sel = rows[idx]
    return float(-np.log2(sel[np.arange(len(r)), r] / sel.sum(-1)).sum())


@dataclass
class LevelFit:
    static: np.ndarray
    ctx_a: np.ndarray
    ctx_b: np.ndarray
    report: dict[str, float]


def fit_level(tb: PaletteTables, t: int, d: LevelData, held: LevelData | None = None) -> LevelFit:
    """Fit one level; α, β chosen on ``held`` (when given) by code length, then refit on both."""
    valid = _valid(tb, t)
    width = tb.width(t)
    shape_a = (tb.n_groups, valid.shape[1], N_A, width)
    shape_b = (tb.n_groups, valid.shape[1], N_NC * width, width)
    va, vb = valid[:, :, None, :], valid[:, :, None, :]
    alpha, beta_a, beta_b = 1.0, 16.0, 16.0
    report: dict[str, float] = {}
    if held is not None and len(held.r_a) + len(held.r_b):
        hg, hp, hr = held.static_view()
        alpha = min(ALPHAS, key=lambda a: _bits(to_rows(static_probs(tb, t, d, a), valid), (hg, hp), hr))
        ps = static_probs(tb, t, d, alpha)
        na = _counts(shape_a, (d.g_a, d.p_a, d.c_a, d.r_a))
        nb = _counts(shape_b, (d.g_b, d.p_b, d.c_b, d.r_b))
        ga, gb, db = fit_shape(ps, na, nb)
        qa, qb = _backoff_a(ps, ga), _backoff_b(ps, gb, db)
        beta_a = min(BETAS, key=lambda b: _bits(to_rows(smoothed(na, qa, b), va),
                                                (held.g_a, held.p_a, held.c_a), held.r_a))
        beta_b = min(BETAS, key=lambda b: _bits(to_rows(smoothed(nb, qb, b), vb),
                                                (held.g_b, held.p_b, held.c_b), held.r_b))
        d = LevelData(*(np.concatenate([x, y]) for x, y in zip(
            (d.g_a, d.p_a, d.c_a, d.r_a, d.g_b, d.p_b, d.c_b, d.r_b),
            (held.g_a, held.p_a, held.c_a, held.r_a, held.g_b, held.p_b, held.c_b, held.r_b), strict=True)))
    ps = static_probs(tb, t, d, alpha)
    na = _counts(shape_a, (d.g_a, d.p_a, d.c_a, d.r_a))
    nb = _counts(shape_b, (d.g_b, d.p_b, d.c_b, d.r_b))
    ga, gb, db = fit_shape(ps, na, nb)
    static = to_rows(ps, valid)
    ctx_a = to_rows(smoothed(na, _backoff_a(ps, ga), beta_a), va)
    ctx_b = to_rows(smoothed(nb, _backoff_b(ps, gb, db), beta_b), vb)
    report.update(alpha=alpha, beta_a=beta_a, beta_b=beta_b, symbols=float(len(d.r_a) + len(d.r_b)),
                  delta_b_max=float(db.max()), gamma_a_mean=float(ga.mean()))
    return LevelFit(static, ctx_a, ctx_b, report)


def fit_context_tables(index_maps_by_group: np.ndarray | Sequence[np.ndarray],
                       tables: PaletteTables | dict[str, np.ndarray], held_out: float = 0.2,
                       report: dict[str, dict[str, float]] | None = None) -> dict[str, np.ndarray]:
    """The ``ctx_*`` arrays for ``palette.npz`` from finest training index maps ([N, G, h, w] or one
    [N, h, w] per group). ``report`` (optional) receives the chosen α, β, γ, δ per level."""
    tb = tables if isinstance(tables, PaletteTables) else PaletteTables.from_arrays(tables)
    maps = as_maps(index_maps_by_group, tb.n_groups)
    n_held = int(round(len(maps) * held_out)) if len(maps) >= 5 else 0
    fit_maps, held_maps = (maps[: len(maps) - n_held], maps[len(maps) - n_held:]) if n_held else (maps, None)
    out: dict[str, np.ndarray] = {"ctx_info": np.asarray([CTX_FORMAT, N_A, N_NC, 0], np.int32)}
    for t in range(tb.n_levels):
        d = level_data(tb, fit_maps, t)
        held = level_data(tb, held_maps, t) if held_maps is not None else None
        f = fit_level(tb, t, d, held)
        out[f"ctx_static_t{t}"] = f.static
        out[f"ctx_a_t{t}"] = f.ctx_a
        out[f"ctx_b_t{t}"] = f.ctx_b
        if report is not None:
            report[f"t{t}"] = f.report
    return out


__all__ = ["fit_context_tables", "level_data", "fit_level", "static_probs"]
