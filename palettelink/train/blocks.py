"""Network blocks shared by both learned codecs' trainers: the feature bottleneck
(:mod:`palettelink.train.bottleneck`) and the image codec (:mod:`palettelink.train.image_codec`).

Both decoders are conditioned on the palette level the same way (:class:`LevelConditioned`: one
embedding row per level plus an "unquantised" row, fed to :class:`FiLM` layers), so a rule about
levels is written once here.

Attribute names are state-dict keys of committed weights (``assets/codecs/*/decoder.pt``,
``encoder.pt``): never rename one (``level_emb``, ``lin``, ``c1``, ``n1``, ``c2``,
``n2``, ``film``); tests/test_export.py and tests/test_palette_train.py load the committed ones.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Level = int | torch.Tensor | None


def batch_norm(c: int, on: bool) -> nn.Module:
    """BatchNorm (a per-channel affine at inference: the ONNX graph stays plain) or nothing."""
    return nn.BatchNorm2d(c) if on else nn.Identity()


class FiLM(nn.Module):
    """x·(1+γ(e)) + β(e); zero-initialised so a new level starts as the identity."""

    def __init__(self, dim: int, channels: int) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, 2 * channels)
        nn.init.zeros_(self.lin.weight)
        nn.init.zeros_(self.lin.bias)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        g, b = self.lin(e).unsqueeze(-1).unsqueeze(-1).chunk(2, dim=1)
        return x * (1 + g) + b


class FiLMBlock(nn.Module):
    """The feature decoder's residual block: x + conv-norm(SiLU(conv-norm(SiLU(FiLM(x, e))))).

    The skip carries x *before* the FiLM; the image decoder's blocks (a :class:`FiLM` then a
    :class:`ResBlock`) skip *after* it and have no norms. Both are trained and committed as they
    are, so they stay two blocks rather than one with switches."""

    def __init__(self, w: int, dim: int, norm: bool) -> None:
        super().__init__()
        self.film = FiLM(dim, w)
        self.c1 = nn.Conv2d(w, w, 3, padding=1)
        self.n1 = batch_norm(w, norm)
        self.c2 = nn.Conv2d(w, w, 3, padding=1)
        self.n2 = batch_norm(w, norm)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return x + self.n2(self.c2(F.silu(self.n1(self.c1(F.silu(self.film(x, e)))))))


class ResBlock(nn.Module):
    """x + conv(SiLU(conv(SiLU(x)))), no norms (the image codec's encoder and generator)."""

    def __init__(self, w: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(w, w, 3, padding=1)
        self.c2 = nn.Conv2d(w, w, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.c2(F.silu(self.c1(F.silu(x))))


class LevelConditioned(nn.Module):
    """A decoder conditioned on the palette level: ``level_emb`` has one row per level and a last,
    "unquantised" row (index ``n_levels``). A subclass is built as ``cls(cfg, n_levels)`` and calls
    :meth:`init_levels` where it creates its embedding (its place in the state dict)."""

    cfg: Any
    n_levels: int
    level_emb: nn.Embedding

    def init_levels(self, n_levels: int, dim: int) -> None:
        self.n_levels = int(n_levels)
        self.level_emb = nn.Embedding(self.n_levels + 1, dim)

    def level_index(self, level: Level, batch: int = 1) -> torch.Tensor:
        """``level`` is an int, a 0-d/[B] int64 tensor, or None; None or any negative value selects the
        "unquantised" row; levels ≥ n_levels are clamped."""
        dev = self.level_emb.weight.device
        if level is None:
            return torch.full((1,), self.n_levels, dtype=torch.long, device=dev)
        if isinstance(level, torch.Tensor):  # keep it a graph input when exported to ONNX
            lv = level.to(torch.long).reshape(-1)
        else:
            lv = torch.tensor([int(level)], dtype=torch.long, device=dev)
        unq = torch.full_like(lv, self.n_levels)
        return torch.where(lv < 0, unq, torch.clamp(lv, max=self.n_levels - 1))

    def resized(self, n_levels: int) -> Any:
        """A copy with ``n_levels`` level rows: shared weights copied, new rows (and the unquantised
        row) start from the "unquantised" row (the palette stage may pick another level count)."""
        new = type(self)(self.cfg, n_levels).to(self.level_emb.weight.device).train(self.training)
        new.load_state_dict({k: v for k, v in self.state_dict().items() if k != "level_emb.weight"},
                            strict=False)
        with torch.no_grad():
            old, k = self.level_emb.weight, min(self.n_levels, n_levels)
            new.level_emb.weight[:k] = old[:k]
            new.level_emb.weight[k:] = old[self.n_levels]
        return new
