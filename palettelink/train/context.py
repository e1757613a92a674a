"""Backward-diffusion entropy models frozen as integer tables (DESIGN §1.6, "Hence the codec" 4).

Fits the ``ctx_*`` arrays that :mod:`palettelink.codecs.palette` reads (layout and the coding
passes a, e, f, d, b in its docstring):

- ``ctx_static_t{t}`` [G, K_{t+1}, M_t]: p(child rank | group, parent), the static fallback;
- ``ctx_a_t{t}`` [G, K_{t+1}, N_A, M_t]: pass a, conditioned on the parent map's neighbourhood;
- ``ctx_{e,f,d,b}_t{t}`` [G, K_{t+1}, N_NC·M_t, M_t]: the other passes, conditioned also on decoded
  neighbours (mode child among same-parent neighbours, its count, their number);
- ``ctx_info`` int32 [4]: format, N_A, N_NC, 0.

Every (parent, context) cell has few samples, so each table is a Dirichlet-smoothed count table that
backs off to a *parametric* model shared by all parents of a level:

    static   p_s(r | P)          = (N(P, r) + α / nch(P)) / (N(P) + α)
    pass a   q_a(r | P, a)       ∝ p_s(r | P) ** γ_a                       (sharpen inside regions)
    others   q(r | P, n, c, m)   ∝ p_s(r | P) ** γ_nc · exp(δ_nc [r = m])  (copy the neighbours' child)
    final    p(r | P, ctx)       = (N(P, ctx, r) + β · q(r | P, ctx)) / (N(P, ctx) + β)

γ, δ (a few numbers per pass and level: the "tiny network" over the discrete contexts) are fitted by
maximum likelihood in torch from the count tables (sufficient statistics, so milliseconds); α and β
by held-out code length (the last fifth of the training maps), then everything is refitted on all
maps. Probabilities become integer rows with ``entropy.normalise_counts`` once, here; decoders only
ever see the integers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from palettelink import entropy
from palettelink.codecs.palette import (
    CTX_FORMAT,
    N_A,
    N_NC,
    PASSES,
    PaletteTables,
    pass_context,
    pass_masks,
)

ALPHAS = (0.25, 1.0, 4.0)
BETAS = (1.0, 4.0, 16.0, 64.0, 256.0)
SCALE = 1 << 20  # float probabilities → integer counts before normalise_counts


@dataclass
class PassData:
    """Coded symbols of one pass: group, parent, context and child rank per symbol."""

    g: np.ndarray
    p: np.ndarray
    c: np.ndarray
    r: np.ndarray

    def __len__(self) -> int:
        return len(self.r)


@dataclass
class LevelData:
    """Every coded symbol of one refinement level over many maps, by pass."""

    passes: dict[str, PassData] = field(default_factory=dict)

    def static_view(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ps = list(self.passes.values())
        return tuple(np.concatenate([getattr(x, k) for x in ps]) for k in "gpr")  # type: ignore[return-value]

    def merged(self, other: LevelData) -> LevelData:
        return LevelData({k: PassData(*(np.concatenate([getattr(v, f), getattr(other.passes[k], f)])
                                        for f in "gpcr")) for k, v in self.passes.items()})


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
    parts: dict[str, list[list[np.ndarray]]] = {p: [[], [], [], []] for p in PASSES}
    gi = np.arange(tb.n_groups)[:, None, None]
    width = tb.width(t)
    for fin in maps:
        ids = tb.ids_at(fin, t)
        par = tb.ids_at(fin, t + 1) if t + 1 < tb.n_levels else np.zeros_like(ids)
        ranks = tb.rank[t][gi, ids]
        multi = tb.nch[t][gi, par] > 1
        gg = np.broadcast_to(gi, ids.shape)
        for name, pm in zip(PASSES, pass_masks(*ids.shape[1:]), strict=True):
            mask = multi & pm[None]
            parts[name][2].append(pass_context(name, par, ranks, width, mask))
            for i, arr in ((0, gg), (1, par), (3, ranks)):
                parts[name][i].append(arr[mask])
    return LevelData({k: PassData(*(np.concatenate(a).astype(np.int64) for a in v))
                      for k, v in parts.items()})


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


def n_contexts(name: str, width: int) -> int:
    return N_A if name == "a" else N_NC * width


def _context_params(name: str, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Per context: its (n, c) class index (γ, δ are shared per class) and its mode child m (-1: none)."""
    if name == "a":
        return np.arange(N_A), np.full(N_A, -1)
    return np.repeat(np.arange(N_NC), width), np.tile(np.arange(width), N_NC)


def backoff(ps: np.ndarray, name: str, gamma: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """q [G, K, n_ctx, M] ∝ p_s ** γ[cls] · exp(δ[cls] [r = m]) (δ unused for pass a)."""
    width = ps.shape[-1]
    cls, mode = _context_params(name, width)
    logp = np.log(np.where(ps > 0, ps, 1.0))[:, :, None, :]
    logit = gamma[cls][None, None, :, None] * logp
    if name != "a":
        logit = logit + (delta[cls][:, None] * (np.arange(width)[None, :] == mode[:, None]))[None, None]
    logit = np.where((ps > 0)[:, :, None, :], logit, -np.inf)
    logit -= logit.max(-1, keepdims=True)
    q = np.exp(logit)
    return q / q.sum(-1, keepdims=True)


def fit_shape(ps: np.ndarray, name: str, counts: np.ndarray, steps: int = 40,
              ) -> tuple[np.ndarray, np.ndarray]:
    """Fit γ, δ of one pass by maximum likelihood (torch, LBFGS) from its count table
    [G, K, n_ctx, M] (sufficient statistics: only the rows that occur are evaluated)."""
    import torch

    width = ps.shape[-1]
    cls_np, mode_np = _context_params(name, width)
    n_cls = int(cls_np.max()) + 1
    gamma = torch.ones(n_cls, dtype=torch.float64, requires_grad=True)
    delta = torch.zeros(n_cls, dtype=torch.float64, requires_grad=True)
    rows = np.nonzero(counts.sum(-1))
    if not len(rows[0]):
        return np.ones(n_cls), np.zeros(n_cls)
    logp = np.log(np.where(ps > 0, ps, 1.0))
    lp, ok = torch.from_numpy(logp[rows[:2]]), torch.from_numpy(ps[rows[:2]] > 0)
    cls = torch.from_numpy(cls_np[rows[2]])
    match = torch.from_numpy((np.arange(width)[None, :] == mode_np[rows[2]][:, None]).astype(np.float64))
    cnt = torch.from_numpy(counts[rows])
    total = float(counts.sum())

    def nll() -> torch.Tensor:
        z = (gamma[cls][:, None] * lp + delta[cls][:, None] * match).masked_fill(~ok, -torch.inf)
        m = z.detach().amax(-1, keepdim=True)
        e = torch.where(ok, torch.exp(z - m), 0.0)
        logsm = z - m - torch.log(e.sum(-1, keepdim=True))
        return -torch.where(cnt > 0, cnt * logsm, 0.0).sum() / total

    params = [gamma, delta] if name != "a" else [gamma]
    opt = torch.optim.LBFGS(params, lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nll()
        loss.backward()
        return loss

    opt.step(closure)
    return gamma.detach().numpy().clip(0.0, 8.0), delta.detach().numpy().clip(-8.0, 16.0)


def smoothed(counts: np.ndarray, prior: np.ndarray, beta: float) -> np.ndarray:
    return (counts + beta * prior) / (counts.sum(-1, keepdims=True) + beta)


def to_rows(p: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Float probabilities → integer rows summing to 2**16 (≥ 1 each), the frozen form."""
    c = np.rint(np.where(valid, p, 0.0) * SCALE).astype(np.int64)
    rows = entropy.normalise_counts(c)
    return rows.astype(np.uint16 if rows.max() < 1 << 16 else np.int32)


def code_bits(rows: np.ndarray, idx: tuple[np.ndarray, ...], r: np.ndarray) -> float:
    """Ideal code length (bits) of symbols ``r`` under integer ``rows[idx]``."""
    if not len(r):
        return 0.0
    sel = rows[idx]
    return float(-np.log2(sel[np.arange(len(r)), r] / sel.sum(-1)).sum())


@dataclass
class LevelFit:
    static: np.ndarray
    ctx: dict[str, np.ndarray]
    report: dict[str, float]


def fit_level(tb: PaletteTables, t: int, d: LevelData, held: LevelData | None = None) -> LevelFit:
    """Fit one level; α and every pass's β chosen on ``held`` by code length, then refit on both."""
    valid = _valid(tb, t)
    width = tb.width(t)
    shapes = {k: (tb.n_groups, valid.shape[1], n_contexts(k, width), width) for k in PASSES}
    vrow = valid[:, :, None, :]
    alpha = 1.0
    beta: dict[str, float] = dict.fromkeys(PASSES, 16.0)
    report: dict[str, float] = {}
    if held is not None and any(len(v) > 0 for v in held.passes.values()):
        hg, hp, hr = held.static_view()
        alpha = min(ALPHAS, key=lambda a: code_bits(to_rows(static_probs(tb, t, d, float(a)), valid),
                                                      (hg, hp), hr))
        ps = static_probs(tb, t, d, alpha)
        for k in PASSES:
            pd, hd = d.passes[k], held.passes[k]
            n = _counts(shapes[k], (pd.g, pd.p, pd.c, pd.r))
            q = backoff(ps, k, *fit_shape(ps, k, n))
            scores = {b: code_bits(to_rows(smoothed(n, q, b), vrow), (hd.g, hd.p, hd.c), hd.r) for b in BETAS}
            beta[k] = min(scores, key=lambda b: scores[b])
        d = d.merged(held)
    ps = static_probs(tb, t, d, alpha)
    ctx = {}
    for k in PASSES:
        pd = d.passes[k]
        n = _counts(shapes[k], (pd.g, pd.p, pd.c, pd.r))
        gamma, delta = fit_shape(ps, k, n)
        ctx[k] = to_rows(smoothed(n, backoff(ps, k, gamma, delta), beta[k]), vrow)
        report[f"beta_{k}"] = beta[k]
        report[f"gamma_{k}_mean"] = float(gamma.mean())
        if k != "a":
            report[f"delta_{k}_max"] = float(delta.max())
    report.update(alpha=alpha, symbols=float(sum(len(v) for v in d.passes.values())))
    return LevelFit(to_rows(ps, valid), ctx, report)


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
        for k, v in f.ctx.items():
            out[f"ctx_{k}_t{t}"] = v
        if report is not None:
            report[f"t{t}"] = f.report
    return out


def evaluate(tables: PaletteTables | dict[str, np.ndarray], maps: np.ndarray | Sequence[np.ndarray],
             latents: np.ndarray | None = None, image_pixels: int = 640 * 640) -> dict[str, Any]:
    """Measured rate of every level (actual coded bytes, both models) and, given the latents the maps
    came from, the relative latent error of every level. For reports and ``codec.json``.

    Keys: ``bits_static`` / ``bits_context`` [L] (mean bits per image, layers only),
    ``bpp_context`` [L] (per pixel of ``image_pixels``), ``saving_pct`` [L], ``mse_rel`` [L],
    ``encode_ms`` / ``decode_ms`` (context model, level 0, median per image).
    """
    import time

    from palettelink.codecs.palette import decode_layers, encode_levels, layer_bits

    tb = tables if isinstance(tables, PaletteTables) else PaletteTables.from_arrays(tables)
    maps = as_maps(maps, tb.n_groups)
    out: dict[str, Any] = {}
    models = ["static"] + (["context"] if tb.ctx is not None else [])
    for model in models:
        per = np.array([layer_bits(m, tb, model) for m in maps], dtype=np.float64)
        out[f"bits_{model}"] = np.cumsum(per.mean(0))[::-1].tolist()  # index = level
    if "bits_context" in out:
        out["saving_pct"] = [100.0 * (1 - c / s) for c, s in zip(out["bits_context"], out["bits_static"],
                                                                   strict=True)]
        out["bpp_context"] = [b / image_pixels for b in out["bits_context"]]
    if latents is not None:
        z = np.asarray(latents, np.float32)
        var = float(z.var())
        out["mse_rel"] = [float(np.mean([((tb.dequantise(tb.ids_at(m, t), t)[0] - zi) ** 2).mean()
                                         for m, zi in zip(maps, z, strict=True)]) / var)
                          for t in range(tb.n_levels)]
    enc, dec = [], []
    for m in maps[: min(len(maps), 20)]:
        t0 = time.perf_counter()
        layers = encode_levels(m, tb, 0)
        t1 = time.perf_counter()
        decode_layers(layers, tb, tb.n_levels - 1, m.shape)
        enc.append(t1 - t0)
        dec.append(time.perf_counter() - t1)
    out["encode_ms"], out["decode_ms"] = 1e3 * float(np.median(enc)), 1e3 * float(np.median(dec))
    return out


__all__ = ["fit_context_tables", "level_data", "fit_level", "static_probs", "code_bits", "evaluate"]
