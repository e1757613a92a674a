"""Contrastive embedding per channel group (DESIGN §1.3): supervised-contrastive (Khosla et al. 2020)
projection heads whose classes are the texture-semantic pseudo-labels.

A head is *linear* (h = A z_g + c), so the edge applies it inside edge.onnx as one matmul. SupCon
pulls positions with the same pseudo-label together on the unit sphere; a small penalty keeps ‖h‖
near 1 so Euclidean K-means in the search space sees the geometry the loss shaped.

A pure SupCon space forgets everything the labels do not encode (two entries of one texture class
could decode to very different latents), so the search map we return keeps the raw channels and
appends the scaled projection: W = [I; λA], b = [0; λc], with λ set so the semantic part carries
``semantic_weight`` × the raw part's variance. ``keep_raw=False`` gives the bare head (D = dim).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from palettelink.train.palette import group_bounds, group_vectors

if TYPE_CHECKING:
    import torch

Head = tuple[np.ndarray, np.ndarray]


def supcon_loss(feats: torch.Tensor, labels: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """Supervised-contrastive loss (Khosla et al., L_out) of L2-normalised ``feats`` [B, D]."""
    import torch

    f = torch.nn.functional.normalize(feats, dim=1)
    sim = f @ f.T / tau
    n = f.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=f.device)
    sim = sim.masked_fill(eye, -torch.inf)
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    pos = (labels[:, None] == labels[None, :]) & ~eye
    n_pos = pos.sum(1)
    keep = n_pos > 0
    mean_log = torch.where(pos, log_prob, 0.0).sum(1)[keep] / n_pos[keep]
    return -mean_log.mean()


def _balanced_batch(rng: np.random.Generator, by_class: list[np.ndarray], batch: int) -> np.ndarray:
    """Classes drawn uniformly, ≥ 2 samples each, so every anchor has a positive."""
    per = 4
    classes = rng.choice(len(by_class), batch // per, replace=len(by_class) < batch // per)
    return np.concatenate([rng.choice(by_class[c], per, replace=len(by_class[c]) < per) for c in classes])


def train_heads(latents: np.ndarray, labels: np.ndarray, groups: int | Sequence[int] | np.ndarray,
                dim: int = 8, seed: int = 0, steps: int = 400, batch: int = 512, tau: float = 0.1,
                lr: float = 1e-2, semantic_weight: float = 1.0, keep_raw: bool = True,
                max_seconds: float = 120.0, report: dict[str, float] | None = None) -> list[Head]:
    """One linear SupCon head per group on latents [N, C, h, w] and labels [N*h*w] (-1 = unlabelled).

    Returns the search maps (W [D, Cg], b [D]) for :func:`palettelink.train.palette.build_palette`.
    Deterministic for a seed (torch and numpy seeded, single-threaded sampling).
    """
    import torch

    latents = np.asarray(latents)
    labels = np.asarray(labels).ravel()
    if labels.size != latents.shape[0] * latents.shape[2] * latents.shape[3]:
        raise ValueError(f"{labels.size} labels for {latents.shape[0]}x{latents.shape[2]}x{latents.shape[3]} "
                         "positions")
    bounds = group_bounds(latents.shape[1], groups)
    ok = labels >= 0
    classes = np.unique(labels[ok])
    if len(classes) < 2:
        raise ValueError("contrastive heads need at least two pseudo-label classes")
    rng = np.random.default_rng(seed)
    idx = np.nonzero(ok)[0]
    by_class = [idx[labels[idx] == c] for c in classes]
    heads: list[Head] = []
    t_end = time.monotonic() + max_seconds
    for g in range(len(bounds) - 1):
        torch.manual_seed(seed + g)
        x_all = group_vectors(latents, int(bounds[g]), int(bounds[g + 1]))
        mu, sd = x_all[ok].mean(0), x_all[ok].std(0) + 1e-6
        lin = torch.nn.Linear(x_all.shape[1], dim)
        opt = torch.optim.Adam(lin.parameters(), lr=lr)
        xt = torch.from_numpy((x_all - mu) / sd)
        lt = torch.from_numpy(labels.astype(np.int64))
        first = last = float("nan")
        for step in range(steps):
            b = torch.from_numpy(_balanced_batch(rng, by_class, batch))
            h = lin(xt[b])
            loss = supcon_loss(h, lt[b], tau) + 0.1 * ((h.norm(dim=1) - 1.0) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            last = float(loss.detach())
            first = last if step == 0 else first
            if time.monotonic() > t_end:
                break
        a = lin.weight.detach().numpy().astype(np.float64) / sd[None, :]  # fold the standardisation in
        c = lin.bias.detach().numpy().astype(np.float64) - a @ mu
        if keep_raw:
            proj = x_all[ok] @ a.T + c
            lam = np.sqrt(semantic_weight * x_all[ok].var(0).sum() / max(proj.var(0).sum(), 1e-12))
            w = np.concatenate([np.eye(x_all.shape[1]), lam * a])
            bb = np.concatenate([np.zeros(x_all.shape[1]), lam * c])
        else:
            w, bb = a, c
        heads.append((w.astype(np.float32), bb.astype(np.float32)))
        if report is not None:
            report[f"g{g}_loss_first"], report[f"g{g}_loss_last"] = first, last
    return heads
