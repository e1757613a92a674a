"""Detection agreement of a trained bottleneck with the uncompressed detector, and the scalar
quantiser of z that the palette must beat (DESIGN §1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from palettelink.train.bottleneck import Decoder, Encoder, QuantiseFn
from palettelink.train.crossing_cache import CrossingCache
from palettelink.train.distill import device_of, reset_anchors


class ScalarQuantiser:
    """Per-channel uniform quantiser of z with fixed ranges (0.01/99.99 percentiles of training
    latents), the baseline the palette must beat (DESIGN §1). ``rate_bits`` estimates the coded size
    with static per-channel histograms fitted on the training latents (Laplace-smoothed), i.e. what
    a static-table ANS coder would spend."""

    def __init__(self, train_latents: np.ndarray, bits: int,
                 ranges: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        c = train_latents.shape[1]
        self.lo, self.hi = ranges if ranges is not None else self.fit_ranges(train_latents)
        self.bits = int(bits)
        self.n = (1 << self.bits) - 1
        q = self.symbols(train_latents)
        self.counts = np.stack([np.bincount(q[:, k].ravel(), minlength=self.n + 1) for k in range(c)])
        smoothed = self.counts + 1.0
        self.logp = np.log2(smoothed / smoothed.sum(1, keepdims=True))

    @staticmethod
    def fit_ranges(train_latents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel (lo, hi): the 0.01 / 99.99 percentiles of the training latents."""
        flat = np.moveaxis(train_latents, 1, 0).reshape(train_latents.shape[1], -1)
        return (np.percentile(flat, 0.01, axis=1).astype(np.float32),
                np.percentile(flat, 99.99, axis=1).astype(np.float32))

    @classmethod
    def from_ranges(cls, lo: np.ndarray, hi: np.ndarray, bits: int) -> ScalarQuantiser:
        """A quantiser with frozen ranges (no histograms): what a decoder needs."""
        q = cls.__new__(cls)
        q.lo, q.hi = np.asarray(lo, np.float32), np.asarray(hi, np.float32)
        q.bits, q.n = int(bits), (1 << int(bits)) - 1
        return q

    def symbols(self, z: np.ndarray) -> np.ndarray:
        lo, hi = self.lo.reshape(1, -1, 1, 1), self.hi.reshape(1, -1, 1, 1)
        step = np.maximum(hi - lo, 1e-6) / self.n
        return np.clip(np.rint((z - lo) / step), 0, self.n).astype(np.int64)

    def dequantise(self, q: np.ndarray) -> np.ndarray:
        lo, hi = self.lo.reshape(1, -1, 1, 1), self.hi.reshape(1, -1, 1, 1)
        return (lo + q * (np.maximum(hi - lo, 1e-6) / self.n)).astype(np.float32)

    def __call__(self, z: torch.Tensor, level: int | None = None) -> torch.Tensor:
        """The ``quantise_fn`` interface of :func:`finetune_decoder` (level ignored)."""
        zq = self.dequantise(self.symbols(z.detach().cpu().numpy()))
        return torch.from_numpy(zq).to(z.device)

    def rate_bits(self, z: np.ndarray) -> float:
        q = self.symbols(z)
        return float(-sum(self.logp[k][q[:, k]].sum() for k in range(q.shape[1])))


@torch.inference_mode()
def evaluate_detection(det: Any, enc: Encoder, dec: Decoder, eval_cache: CrossingCache,
                       train_latents: np.ndarray | None = None, bits: Sequence[int] = (8, 6, 4, 3, 2),
                       quantisers: dict[str, tuple[QuantiseFn, int | None]] | None = None,
                       ref_conf: float = 0.25, pred_conf: float = 0.001) -> dict[str, Any]:
    """AP50 / AP50:95 of the tail on decoded tensors vs the uncompressed detector (the reference is
    the tail on the true crossing tensors at ``ref_conf``, predictions keep boxes ≥ ``pred_conf``:
    the benchmark's protocol). Rows: "split (uncompressed)", "z unquantised", "z {b} bit" (scalar,
    with estimated bpp when ``train_latents`` are given) and any extra ``quantisers``
    (name → (quantise_fn, decoder level))."""
    from palettelink.scoring import evaluate

    reset_anchors(det)
    dev = device_of(det)
    n = len(eval_cache)
    refs, ts_all, lbs = [], [], []
    for i in range(n):
        ts = eval_cache.batch([i], device=dev)
        lb = eval_cache.letterbox(i)
        refs.append(det.postprocess(det.tail(ts), lb, conf=ref_conf))
        ts_all.append(ts)
        lbs.append(lb)
    z_all = [enc(ts) for ts in ts_all]
    pixels = [lb.width * lb.height for lb in lbs]
    rows: dict[str, Any] = {"n_images": n, "n_reference_boxes": sum(len(r) for r in refs)}

    def score(name: str, zs: Sequence[torch.Tensor] | None, level: int | None, bpp: float | None) -> None:
        preds = []
        for i in range(n):
            tensors = ts_all[i] if zs is None else dec(zs[i], level)
            preds.append(det.postprocess(det.tail(tensors), lbs[i], conf=pred_conf))
        r = evaluate(refs, preds)
        rows[name] = {"ap50": round(r.ap50, 4), "ap50_95": round(r.ap50_95, 4),
                      **({"bpp": round(bpp, 4)} if bpp is not None else {})}

    score("split (uncompressed)", None, None, None)
    score("z unquantised", z_all, None, None)
    if train_latents is not None:
        for b in bits:
            q = ScalarQuantiser(train_latents, b)
            zq = [q(z) for z in z_all]
            bpp = float(np.mean([q.rate_bits(z.cpu().numpy()) / p
                                 for z, p in zip(z_all, pixels, strict=True)]))
            score(f"z {b} bit", zq, None, bpp)
    for name, (fn, level) in (quantisers or {}).items():
        score(name, [fn(z, level if level is not None else -1) for z in z_all], level, None)
    return rows
