"""Learned bottleneck on the split (DESIGN "Hence the codec we build" 1 and 3): the networks and
their files.

The edge :class:`Encoder` (~0.26 M params) maps all crossing tensors (P3 stride 8, P4 stride 16,
P5 stride 32) to one latent z [C=32, stride 16]; the server :class:`Decoder` (~3.1 M params, FiLM
conditioned on the palette level) rebuilds them. Level ``None``/-1 means "unquantised".

How they are trained lives one module over each: the distillation losses in
:mod:`palettelink.train.distill`, the loops (:func:`~palettelink.train.bottleneck_training.train_bottleneck`,
:func:`~palettelink.train.bottleneck_training.finetune_decoder`) in
:mod:`palettelink.train.bottleneck_training`, and the detection-agreement evaluation with the scalar
baseline in :mod:`palettelink.train.bottleneck_eval`. This module knows neither.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from palettelink.train.blocks import FiLM, FiLMBlock, Level, LevelConditioned, batch_norm
from palettelink.train.crossing_cache import CrossingCache
from palettelink.train.stages import JsonConfig

QuantiseFn = Callable[[torch.Tensor, int], torch.Tensor]

# the BottleneckConfig fields that shape the networks besides their channel counts (z_channels,
# in_channels, n_levels): a warm start keeps them, and checkpoints are averaged only when all agree
SHAPE_FIELDS = ("enc_width", "dec_width", "dec_blocks", "level_dim", "norm", "z_stride")


@dataclass
class BottleneckConfig(JsonConfig):
    """Architecture + training hyper-parameters; stored in codec.json (``to_dict``/``from_dict``)."""

    in_channels: tuple[int, ...] = (128, 256, 512)
    in_strides: tuple[int, ...] = (8, 16, 32)
    z_channels: int = 32
    z_stride: int = 16
    enc_width: int = 96
    dec_width: int = 192
    dec_blocks: int = 2
    level_dim: int = 64
    norm: bool = True  # BatchNorm after hidden convs (folds into the convs at export)
    n_levels: int = 8
    size: int = 640
    crop: int = 256
    batch: int = 4
    lr: float = 1e-3
    lr_min_frac: float = 0.02
    warmup: int = 100
    w_feat: float = 0.5
    w_neck: float = 2.0
    w_cls: float = 20.0
    w_box: float = 0.2
    w_false: float = 0.0  # extra class-KL weight where the student fires above the teacher (false boxes)
    w_rank: float = 0.0  # which class wins where the teacher reports a box (distill.rank_loss)
    task_start: float = 0.05  # task loss off for this fraction of training (features first) ...
    task_ramp: float = 0.1  # ... then ramps in linearly over this fraction
    tensor_weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    class_weights: list[float] | None = None  # class-KL weight per detector class (None: all 1)
    noise_prob: float = 0.75  # fraction of samples whose z is perturbed
    noise_min: float = 0.05  # step range, relative to each channel's std (log-uniform)
    noise_max: float = 1.0
    seed: int = 0

    @classmethod
    def for_detector(cls, det: Any, size: int = 640, **kw: Any) -> BottleneckConfig:
        """Channels/strides of ``det``'s crossing tensors at input ``size``."""
        with torch.inference_mode():
            outs = det.front(torch.zeros(1, 3, size, size, device=det.device))
        return cls(in_channels=tuple(int(t.shape[1]) for t in outs),
                   in_strides=tuple(size // int(t.shape[2]) for t in outs), size=size, **kw)


def as_bottleneck_config(cfg: Any, det: Any, size: int = 640) -> BottleneckConfig:
    """A BottleneckConfig from None, a BottleneckConfig, a dict (codec.json's "bottleneck") or a
    pipeline config object (duck-typed: ``latent_channels``, ``n_levels``, ``seed``)."""
    if isinstance(cfg, BottleneckConfig):
        return cfg
    base = BottleneckConfig.for_detector(det, size)
    if cfg is None:
        return base
    if isinstance(cfg, dict):
        return BottleneckConfig.from_dict({**base.to_dict(), **cfg})
    return replace(base, z_channels=int(getattr(cfg, "latent_channels", None) or base.z_channels),
                   n_levels=int(getattr(cfg, "n_levels", base.n_levels)),
                   seed=int(getattr(cfg, "seed", base.seed)))


class _Standardise(nn.Module):
    """Per-channel mean/std of one crossing tensor (buffers, saved with the weights)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(1, channels, 1, 1))
        self.register_buffer("std", torch.ones(1, channels, 1, 1))

    def set(self, mean: np.ndarray, std: np.ndarray) -> None:
        self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32).view_as(self.mean))
        self.std.copy_(torch.as_tensor(std, dtype=torch.float32).clamp_min(1e-4).view_as(self.std))

    def norm(self, t: torch.Tensor) -> torch.Tensor:
        return (t - self.mean) / self.std

    def denorm(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.std + self.mean


def _resample(x: torch.Tensor, factor: float) -> torch.Tensor:
    return F.interpolate(x, scale_factor=factor, mode="nearest")


class Encoder(nn.Module):
    """Edge side: crossing tensors → z [C, size/z_stride]. Convs + BatchNorm + SiLU (no GroupNorm:
    BatchNorm becomes a per-channel affine at inference, so the ONNX graph stays plain).

    Each input is standardised per channel, brought to stride 16 (stride-8 via a stride-2 conv,
    stride-16 via 1×1, stride-32 via 1×1 + nearest upsampling), concatenated and mixed by 3×3 convs.
    Without normalisation the net trained erratically (loss spikes with Adam, no progress in 150
    steps); with it, it learns steadily.
    """

    def __init__(self, cfg: BottleneckConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.stats = nn.ModuleList(_Standardise(c) for c in cfg.in_channels)
        w = cfg.enc_width
        branch: list[nn.Module] = []
        widths = []
        for c, s in zip(cfg.in_channels, cfg.in_strides, strict=True):
            out = 64 if s > cfg.z_stride else 32
            if s < cfg.z_stride:
                k = cfg.z_stride // s
                branch.append(nn.Conv2d(c, out, 2 * k - 1 if k == 2 else k, stride=k,
                                        padding=(k - 1) if k == 2 else 0))
            else:
                branch.append(nn.Conv2d(c, out, 1))
            widths.append(out)
        self.branch = nn.ModuleList(branch)
        self.branch_norm = nn.ModuleList(batch_norm(o, cfg.norm) for o in widths)
        self.mix = nn.Sequential(
            nn.SiLU(), nn.Conv2d(sum(widths), w, 3, padding=1), batch_norm(w, cfg.norm),
            nn.SiLU(), nn.Conv2d(w, 64, 3, padding=1), batch_norm(64, cfg.norm),
            nn.SiLU(), nn.Conv2d(64, cfg.z_channels, 3, padding=1))

    def set_stats(self, stats: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
        for s, (m, sd) in zip(self.stats, stats, strict=True):
            s.set(m, sd)

    def forward(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        parts = []
        for t, st, b, bn, s in zip(tensors, self.stats, self.branch, self.branch_norm, self.cfg.in_strides,
                                   strict=True):
            y = bn(b(st.norm(t)))
            if s > self.cfg.z_stride:
                y = _resample(y, s / self.cfg.z_stride)
            parts.append(y)
        return self.mix(torch.cat(parts, 1))


class Decoder(LevelConditioned):
    """Server side: (z, level) → crossing tensors [t4', t6', t9'] in the front's units.

    ``level`` is an int, a 0-d/[B] int64 tensor, or None; None or any negative value selects the
    extra "unquantised" embedding row (index ``n_levels``); levels ≥ n_levels are clamped.
    """

    def __init__(self, cfg: BottleneckConfig, n_levels: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        w, d = cfg.dec_width, cfg.level_dim
        self.init_levels(n_levels if n_levels is not None else cfg.n_levels, d)
        self.stem = nn.Sequential(nn.Conv2d(cfg.z_channels, w, 3, padding=1), batch_norm(w, cfg.norm))
        self.film0 = FiLM(d, w)
        self.blocks = nn.ModuleList(FiLMBlock(w, d, cfg.norm) for _ in range(cfg.dec_blocks))
        nb = cfg.norm
        heads: list[nn.Module] = []
        for c, s in zip(cfg.in_channels, cfg.in_strides, strict=True):
            if s < cfg.z_stride:
                k = cfg.z_stride // s
                # sub-pixel upsampling: the 3×3 conv runs at stride 16, 4× cheaper than after upsampling
                heads.append(nn.Sequential(nn.Conv2d(w, k * k * 64, 3, padding=1), nn.PixelShuffle(k),
                                           batch_norm(64, nb), nn.SiLU(), nn.Conv2d(64, 128, 3, padding=1),
                                           batch_norm(128, nb), nn.SiLU(), nn.Conv2d(128, c, 1)))
            elif s > cfg.z_stride:
                k = s // cfg.z_stride
                heads.append(nn.Sequential(nn.Conv2d(w, w, 2 * k - 1, stride=k, padding=k - 1),
                                           batch_norm(w, nb), nn.SiLU(), nn.Conv2d(w, w, 3, padding=1),
                                           batch_norm(w, nb), nn.SiLU(), nn.Conv2d(w, c, 1)))
            else:
                heads.append(nn.Sequential(nn.Conv2d(w, w, 3, padding=1), batch_norm(w, nb), nn.SiLU(),
                                           nn.Conv2d(w, c, 1)))
        self.heads = nn.ModuleList(heads)
        self.stats = nn.ModuleList(_Standardise(c) for c in cfg.in_channels)

    def set_stats(self, stats: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
        for s, (m, sd) in zip(self.stats, stats, strict=True):
            s.set(m, sd)

    def forward_normalised(self, z: torch.Tensor, level: Level = None) -> list[torch.Tensor]:
        """Outputs in standardised units (what the feature loss compares)."""
        e = self.level_emb(self.level_index(level, z.shape[0]))
        x = self.film0(self.stem(z), e)
        for b in self.blocks:
            x = b(x, e)
        x = F.silu(x)
        return [h(x) for h in self.heads]

    def forward(self, z: torch.Tensor, level: Level = None) -> list[torch.Tensor]:
        return [s.denorm(y) for s, y in zip(self.stats, self.forward_normalised(z, level), strict=True)]


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@torch.no_grad()
def sync_level_rows(dec: Decoder) -> None:
    """Copy the "unquantised" level embedding into every level row. Training only uses that row, so
    afterwards every level decodes like the unquantised path until :func:`finetune_decoder` teaches
    the levels (an untrained random row would make FiLM modulate arbitrarily)."""
    dec.level_emb.weight[: dec.n_levels] = dec.level_emb.weight[dec.n_levels]


# the decoder's stem weights of added latent channels, relative to the trained ones' spread: near zero,
# so decoding starts as before to within about a percent, but not zero: a zero weight passes no
# gradient back to the new channels' encoder filters, and with it the grown channels stayed random
# (880 steps from p11 with 16 added channels: their stem weights reached 4 % of the old ones' size)
NEW_LATENT_WEIGHT = 0.01


def _latent_grown(state: dict[str, torch.Tensor], key: str, target: torch.Tensor, dim: int,
                  fill: torch.Tensor) -> dict[str, torch.Tensor]:
    """``state`` with ``state[key]`` placed into ``fill`` (``target``'s shape) along ``dim``: the
    first latent channels keep their trained weights, the added ones take ``fill``'s."""
    old = state[key]
    if old.shape[dim] > target.shape[dim]:
        raise ValueError(f"a latent cannot shrink: {old.shape[dim]} channels into {target.shape[dim]}")
    grown = fill.clone()
    grown.narrow(dim, 0, old.shape[dim]).copy_(old)
    return {**state, key: grown}


@torch.no_grad()
def grow_encoder(enc: Encoder, narrower: Encoder) -> None:
    """Load ``narrower``'s weights into ``enc``, whose latent has as many or more channels, the same
    shapes otherwise. The first channels of z are computed exactly as before; the added ones keep
    ``enc``'s own random start, and the decoder gives them near-zero weight (:func:`grow_decoder`):
    decoding starts as before, and both sides learn from the first step.

    Why: the held-out curve flattened with 32 channels at every bottleneck length and decoder depth
    tried (p11-p13); what the latent can carry is the remaining cap, and a latent trained from scratch
    costs hours of CPU that the warm start already spent (Net2Net's "wider" move, on z)."""
    last = f"mix.{len(enc.mix) - 1}"
    own, state = enc.state_dict(), narrower.state_dict()
    for name in ("weight", "bias"):
        key = f"{last}.{name}"
        state = _latent_grown(state, key, own[key], 0, own[key])
    enc.load_state_dict(state)


@torch.no_grad()
def grow_decoder(dec: Decoder, shallower: Decoder) -> None:
    """Load ``shallower``'s weights into ``dec``, which has as many or more residual blocks and latent
    channels, the same widths otherwise; the added blocks (after the existing ones) start as the
    identity: their last norm's scale and shift (or, without norms, their last conv) are zero, so
    ``dec`` decodes exactly as ``shallower`` did; added latent channels enter the stem with near-zero
    weights (:data:`NEW_LATENT_WEIGHT`), so it decodes as before to within about a percent.

    Why: a codec whose held-out curve has flattened needs capacity, and a wider or deeper decoder
    trained from scratch costs hours of CPU that the warm start already spent. A block that starts as
    the identity keeps everything learned; its scale leaves zero at the first step (its gradient is
    the block's own output), and then the block learns like any other (Net2Net's "deeper" move). The
    new channels' small stem weights give their encoder filters a gradient from the first step, which
    Adam scales to a full-size update."""
    if dec.cfg.dec_blocks < shallower.cfg.dec_blocks:
        raise ValueError(f"a decoder cannot shrink: {shallower.cfg.dec_blocks} blocks into "
                         f"{dec.cfg.dec_blocks}")
    stem, state = dec.stem[0].weight, shallower.state_dict()
    gen = torch.Generator().manual_seed(dec.cfg.seed)
    scale = NEW_LATENT_WEIGHT * state["stem.0.weight"].std()
    fill = torch.randn(stem.shape, generator=gen).to(stem) * scale
    state = _latent_grown(state, "stem.0.weight", stem, 1, fill)
    missing, unexpected = dec.load_state_dict(state, strict=False)
    new_blocks = range(shallower.cfg.dec_blocks, dec.cfg.dec_blocks)
    allowed = tuple(f"blocks.{i}." for i in new_blocks)
    if unexpected or any(not k.startswith(allowed) for k in missing):
        raise ValueError(f"decoder shapes differ beyond the number of blocks (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    for i in new_blocks:
        last = dec.blocks[i].n2 if isinstance(dec.blocks[i].n2, nn.BatchNorm2d) else dec.blocks[i].c2
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)


def save_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1))


def save_models(enc: Encoder, dec: Decoder, out: str | Path, report: dict[str, Any] | None = None) -> None:
    """``encoder.pt``/``decoder.pt`` (state dicts) + ``config.json`` (+ ``train_log.json``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(enc.state_dict(), out / "encoder.pt")
    torch.save(dec.state_dict(), out / "decoder.pt")
    save_json(out / "config.json", {**enc.cfg.to_dict(), "decoder_n_levels": dec.n_levels})
    if report is not None:
        save_json(out / "train_log.json", report)


def load_models(folder: str | Path, device: str = "cpu") -> tuple[Encoder, Decoder]:
    """Inverse of :func:`save_models` (eval mode)."""
    folder = Path(folder)
    d = json.loads((folder / "config.json").read_text())
    cfg = BottleneckConfig.from_dict(d)
    enc = Encoder(cfg)
    enc.load_state_dict(torch.load(folder / "encoder.pt", map_location=device, weights_only=True))
    dec = Decoder(cfg, int(d.get("decoder_n_levels", cfg.n_levels)))
    dec.load_state_dict(torch.load(folder / "decoder.pt", map_location=device, weights_only=True))
    return enc.to(device).eval(), dec.to(device).eval()


def load(folder: str | Path, cfg: Any = None, device: str = "cpu") -> tuple[Encoder, Decoder]:
    """Alias of :func:`load_models` (``cfg`` is ignored: the folder's config.json is authoritative)."""
    return load_models(folder, device)


def load_decoder(folder: str | Path, cfg: Any = None, device: str = "cpu") -> Decoder:
    """A decoder saved by :func:`finetune_decoder` (``decoder.pt`` + ``config.json`` in ``folder``)."""
    folder = Path(folder)
    c = BottleneckConfig.from_dict(json.loads((folder / "config.json").read_text()))
    sd = torch.load(folder / "decoder.pt", map_location=device, weights_only=True)
    dec = Decoder(c, int(sd["level_emb.weight"].shape[0]) - 1)
    dec.load_state_dict(sd)
    return dec.to(device).eval()


@torch.inference_mode()
def encode_latents(enc: Encoder, cache: CrossingCache, batch: int = 8,
                   device: str | None = None) -> np.ndarray:
    """z of every cache entry (full size, no perturbation) → float32 [N, C, h, w]."""
    dev = device or str(next(enc.parameters()).device)
    was = enc.training
    enc.eval()
    outs = []
    for s in range(0, len(cache), batch):
        ts = cache.batch(list(range(s, min(s + batch, len(cache)))), device=dev)
        outs.append(enc(ts).float().cpu().numpy())
    enc.train(was)
    return np.concatenate(outs) if outs else np.zeros((0, enc.cfg.z_channels, 0, 0), np.float32)
