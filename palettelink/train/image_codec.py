"""The *image bundle*'s codec: a pixel autoencoder whose latent goes through the same palette codec.

Where splitting a task model does not pay (face mesh, MoveNet, selfie segmentation: too small for a
split to save the edge anything, and a different network per task), the edge sends the image itself,
compressed: an :class:`ImageEncoder` (ONNX on the edge, inside ``edge.onnx``) maps the letterboxed
image to z [C, S/8, S/8]; the nested palettes, the Markov levels and the context-coded progressive
stream are exactly those of the feature codec; an :class:`ImageDecoder` (the *generator*, on the
server, FiLM-conditioned on the palette level) rebuilds x̂, which feeds every unsplit task model of
the model zoo and is the preview a person looks at. In bundle terms the split is at the input: the
one crossing tensor is the image, the front is the identity (:class:`IdentityFront`).

Training is plain reconstruction, no labels: L1 + (1 − MS-SSIM) (``pytorch-msssim``) on random
crops of augmented letterboxed images, with the quantisation-like perturbation of z the feature
bottleneck uses (:func:`palettelink.train.bottleneck.perturb_latent`); then the palette is built on
the encoder's latents and the generator is fine-tuned on palette-decoded z at every level.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from palettelink.bundle import atomic_write_folder, write_manifest
from palettelink.train.blocks import FiLM, Level, LevelConditioned, ResBlock
from palettelink.train.distill import perturb_latent
from palettelink.train.stages import JsonConfig

ARCH = "image"
# What an image bundle's codec is "trained for" (the role a detector's sha256 plays for a split
# bundle): the identity front at its input size.
IDENTITY_SOURCE = "palettelink identity front (RGB in [0, 1], letterboxed, grey 114)"


def identity_source_sha256(size: int) -> str:
    return hashlib.sha256(f"{IDENTITY_SOURCE} {size}".encode()).hexdigest()


@dataclass
class ImageCodecConfig(JsonConfig):
    """Architecture + training hyper-parameters; stored in codec.json's "bottleneck" block."""

    arch: str = ARCH
    z_channels: int = 32
    z_stride: int = 8
    enc_widths: tuple[int, int, int] = (48, 80, 128)
    dec_width: int = 128
    dec_blocks: int = 2
    level_dim: int = 32
    n_levels: int = 8
    size: int = 512
    crop: int = 128
    batch: int = 12
    lr: float = 1e-3
    lr_min_frac: float = 0.05
    warmup: int = 100
    w_msssim: float = 0.8  # loss = (1 - w) · L1 · 10 + w · (1 - MS-SSIM)
    noise_prob: float = 0.75
    noise_min: float = 0.05
    noise_max: float = 1.0
    seed: int = 0
    in_channels: tuple[int, ...] = (3,)  # the one crossing tensor: the image
    in_strides: tuple[int, ...] = (1,)
    extra: dict[str, Any] = field(default_factory=dict)


class IdentityFront:
    """The front of an image bundle: the letterboxed image crosses as it is. Duck-types the parts of
    :class:`palettelink.models.ultra.SplitDetector` that the codec's export uses."""

    def __init__(self, size: int) -> None:
        self.layers = nn.ModuleList([nn.Identity()])
        self.split = 0
        self.crossing = [0]
        self.size = size
        self.device = "cpu"

    def front(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x]


class ImageEncoder(nn.Module):
    """Edge: image [B,3,S,S] in [0, 1] → z [B, C, S/8, S/8]. Three stride-2 convs and a residual
    block at stride 8: ~1 GMAC at 512², cheap next to any task model."""

    def __init__(self, cfg: ImageCodecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        a, b, c = cfg.enc_widths
        self.net = nn.Sequential(
            nn.Conv2d(3, a, 5, stride=2, padding=2), nn.SiLU(),
            nn.Conv2d(a, b, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(b, c, 3, stride=2, padding=1), ResBlock(c), nn.SiLU(),
            nn.Conv2d(c, cfg.z_channels, 3, padding=1))

    def forward(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.net(tensors[0] - 0.5)


class _Up(nn.Module):
    """×2 by sub-pixel convolution (the 3×3 conv runs before upsampling: 4× cheaper)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, 4 * cout, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)
        self.post = nn.Conv2d(cout, cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.silu(self.shuffle(self.conv(x)))
        return y + self.post(y)


class ImageDecoder(LevelConditioned):
    """Server (the generator): (z, level) → [x̂ [B,3,S,S] in [0, 1]]. ``level`` as for the feature
    decoder (:class:`palettelink.train.blocks.LevelConditioned`: None/negative is unquantised)."""

    def __init__(self, cfg: ImageCodecConfig, n_levels: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        w, d = cfg.dec_width, cfg.level_dim
        self.init_levels(n_levels if n_levels is not None else cfg.n_levels, d)
        self.stem = nn.Conv2d(cfg.z_channels, w, 3, padding=1)
        self.films = nn.ModuleList(FiLM(d, w) for _ in range(cfg.dec_blocks))
        self.blocks = nn.ModuleList(ResBlock(w) for _ in range(cfg.dec_blocks))
        ups, c = [], w
        for _ in range(int(round(math.log2(cfg.z_stride)))):
            ups.append(_Up(c, max(32, c // 2)))
            c = max(32, c // 2)
        self.ups = nn.ModuleList(ups)
        self.out = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, z: torch.Tensor, level: Level = None) -> list[torch.Tensor]:
        e = self.level_emb(self.level_index(level, z.shape[0]))
        x = self.stem(z)
        for film, block in zip(self.films, self.blocks, strict=True):
            x = block(film(x, e))
        for up in self.ups:
            x = up(x)
        return [torch.clamp(self.out(F.silu(x)) + 0.5, 0.0, 1.0)]


def image_loss(x_hat: torch.Tensor, x: torch.Tensor, cfg: ImageCodecConfig) -> torch.Tensor:
    from pytorch_msssim import ms_ssim

    l1 = (x_hat - x).abs().mean()
    ms = ms_ssim(x_hat, x, data_range=1.0, size_average=True, win_size=7)  # 5 scales fit 128² crops
    return (1 - cfg.w_msssim) * 10.0 * l1 + cfg.w_msssim * (1.0 - ms)


def psnr(x_hat: np.ndarray, x: np.ndarray) -> float:
    mse = float(np.mean((np.asarray(x_hat, np.float64) - np.asarray(x, np.float64)) ** 2))
    return 99.0 if mse <= 1e-12 else 10.0 * math.log10(1.0 / mse)


# --------------------------------------------------------------------------------------------------
# training


class _Views:
    """Random augmented crops of letterboxed training images (in memory, shrunk to ≤ 1024 px)."""

    def __init__(self, rgbs: Sequence[np.ndarray], cfg: ImageCodecConfig, seed: int) -> None:
        import cv2

        self.rgbs = []
        for im in rgbs:
            s = 1024 / max(im.shape[:2])
            self.rgbs.append(cv2.resize(im, (round(im.shape[1] * s), round(im.shape[0] * s)),
                                        interpolation=cv2.INTER_AREA) if s < 1 else im)
        self.cfg = cfg
        self.rng = np.random.default_rng(seed)

    def batch(self) -> torch.Tensor:
        from palettelink.train.augment import augmented_input

        cfg, out = self.cfg, []
        for _ in range(cfg.batch):
            im = self.rgbs[int(self.rng.integers(len(self.rgbs)))]
            x, lb = augmented_input(im, cfg.size, self.rng if self.rng.random() < 0.8 else None)
            # crops mostly over the picture, not the grey padding
            h, w = round(lb.height * lb.scale), round(lb.width * lb.scale)
            c = cfg.crop
            y0 = int(self.rng.integers(max(0, lb.pad_y - c // 4),
                                       max(1, min(cfg.size - c, lb.pad_y + h - c)) + 1))
            x0 = int(self.rng.integers(max(0, lb.pad_x - c // 4),
                                       max(1, min(cfg.size - c, lb.pad_x + w - c)) + 1))
            y0, x0 = min(y0, cfg.size - c), min(x0, cfg.size - c)
            out.append(x[0, :, y0:y0 + c, x0:x0 + c])
        return torch.from_numpy(np.stack(out))


def _lr(cfg: ImageCodecConfig, progress: float, step: int) -> float:
    warm = min(1.0, (step + 1) / max(cfg.warmup, 1))
    cos = 0.5 * (1 + math.cos(math.pi * min(progress, 1)))
    return cfg.lr * warm * (cfg.lr_min_frac + (1 - cfg.lr_min_frac) * cos)


def train_autoencoder(views: _Views, cfg: ImageCodecConfig, minutes: float, out: Path,
                      steps: int = 1_000_000, log_every: int = 50) -> tuple[ImageEncoder, ImageDecoder]:
    """Stage 1: encoder + generator on noisy z, until ``minutes`` or ``steps``; checkpoints in ``out``
    every few minutes (resumes from ``out/ckpt.pt``)."""
    torch.manual_seed(cfg.seed)
    enc, dec = ImageEncoder(cfg), ImageDecoder(cfg)
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    ck = out / "ckpt.pt"
    step, spent = 0, 0.0
    if ck.is_file():
        s = torch.load(ck, map_location="cpu", weights_only=False)
        enc.load_state_dict(s["enc"])
        dec.load_state_dict(s["dec"])
        opt.load_state_dict(s["opt"])
        step, spent = int(s["step"]), float(s["seconds"])
    budget = minutes * 60.0
    t0, last_save, hist = time.perf_counter() - spent, time.perf_counter(), []

    def save() -> None:
        tmp = out / ".ckpt.pt"
        torch.save({"enc": enc.state_dict(), "dec": dec.state_dict(), "opt": opt.state_dict(),
                    "step": step, "seconds": time.perf_counter() - t0}, tmp)
        tmp.replace(ck)

    enc.train()
    dec.train()
    while step < steps and time.perf_counter() - t0 < budget:
        prog = (time.perf_counter() - t0) / budget
        for g in opt.param_groups:
            g["lr"] = _lr(cfg, prog, step)
        x = views.batch()
        z = perturb_latent(enc([x]), cfg, gen)  # type: ignore[arg-type]
        (x_hat,) = dec(z, None)
        loss = image_loss(x_hat, x, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*enc.parameters(), *dec.parameters()], 1.0)
        opt.step()
        hist.append(float(loss.detach()))
        step += 1
        if step % log_every == 0:
            with torch.no_grad():
                p = psnr(x_hat.detach().numpy(), x.numpy())
            print(f"[image-codec] step {step} {time.perf_counter() - t0:6.0f}s "
                  f"loss {np.mean(hist[-log_every:]):.4f} psnr(noisy z) {p:.2f} dB", flush=True)
        if time.perf_counter() - last_save > 180:
            save()
            last_save = time.perf_counter()
    save()
    final = float(np.mean(hist[-100:])) if hist else None
    (out / "report.json").write_text(json.dumps({"steps": step, "seconds": time.perf_counter() - t0,
                                                 "final_loss": final}))
    return enc.eval(), dec.eval()


@torch.no_grad()
def encode_latents(enc: ImageEncoder, rgbs: Sequence[np.ndarray], size: int, extra_views: int = 2,
                   seed: int = 0) -> np.ndarray:
    """z of every image's plain letterbox (what the edge sends) plus ``extra_views`` augmented ones."""
    from palettelink.image import letterbox
    from palettelink.train.augment import augmented_input

    rng = np.random.default_rng(seed)
    zs = []
    for im in rgbs:
        xs = [letterbox(im, size)[0]] + [augmented_input(im, size, rng)[0] for _ in range(extra_views)]
        for x in xs:
            zs.append(enc([torch.from_numpy(x)]).numpy())
    return np.concatenate(zs).astype(np.float32)


def finetune_generator(enc: ImageEncoder, dec: ImageDecoder, views: _Views, quantise: Any, n_levels: int,
                       minutes: float, cfg: ImageCodecConfig, steps: int = 1_000_000) -> ImageDecoder:
    """Stage 3: the level-conditioned generator on palette-decoded z (encoder frozen), a random level
    per sample (plus the unquantised path, so it is kept). Training the encoder along through a
    straight-through palette (VQ-VAE style, commitment weight 0.05, encoder at 0.03× the rate) was
    tried and diverged (loss 0.25 → 0.64 in 300 steps: z drifts off the fixed palette)."""
    dec = dec.resized(n_levels) if dec.n_levels != n_levels else dec
    opt = torch.optim.Adam(dec.parameters(), lr=cfg.lr * 0.3)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    t0, step = time.perf_counter(), 0
    dec.train()
    while step < steps and time.perf_counter() - t0 < minutes * 60:
        x = views.batch()
        with torch.no_grad():
            z = enc([x])
        lv = torch.randint(-1, n_levels, (x.shape[0],), generator=gen)
        zq = quantise(z, lv.clamp_min(0))
        zq = torch.where((lv < 0).view(-1, 1, 1, 1), z, zq)
        (x_hat,) = dec(zq, lv)
        loss = image_loss(x_hat, x, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 50 == 0:
            print(f"[image-codec] finetune step {step} loss {float(loss.detach()):.4f}", flush=True)
    return dec.eval()


IMAGE_STAGES = ("autoencoder", "palette", "finetune", "context")


def train_image_codec(items: Sequence[Any], work: Path, out: Path, cfg: ImageCodecConfig | None = None,
                      minutes: float = 30.0, finetune_minutes: float = 6.0, groups: int = 4, k0: int = 256,
                      tiny: bool = False, force: Sequence[str] = ()) -> Path:
    """Every stage, cached in ``work``; writes the assets folder ``out`` (the same files a feature
    codec's assets hold, so ``build-bundle`` installs either). ``force``: stages to run again; a
    forced autoencoder *continues* from its checkpoint up to ``minutes`` in all (so a longer budget
    trains on), and every later stage is redone."""
    from palettelink.train import context, data, palette
    from palettelink.train.stages import Stage, context_stage, jsonable

    cfg = cfg or ImageCodecConfig()
    work.mkdir(parents=True, exist_ok=True)
    forced = [s for s in IMAGE_STAGES if s in force]
    if forced:  # a stage forced means every stage after it is stale too
        for name in IMAGE_STAGES[IMAGE_STAGES.index(forced[0]):]:
            if name == "autoencoder":
                (work / name / "done.json").unlink(missing_ok=True)
            else:
                shutil.rmtree(work / name, ignore_errors=True)
    rgbs = data.load_all_rgb(items)
    views = _Views(rgbs, cfg, cfg.seed)
    report: dict[str, Any] = {"config": cfg.to_dict(), "train_images": data.describe_sources(items),
                              "train_items": [data.item_key(i) for i in items], "stages": {}}
    t0 = time.perf_counter()
    st = Stage(work, "autoencoder")
    if not st.done:
        train_autoencoder(views, cfg, minutes, st.dir, steps=4 if tiny else 1_000_000)
        st.finish(json.loads((st.dir / "report.json").read_text()))
    ck = torch.load(st.dir / "ckpt.pt", map_location="cpu", weights_only=False)
    enc, dec = ImageEncoder(cfg), ImageDecoder(cfg)
    enc.load_state_dict(ck["enc"])
    dec.load_state_dict(ck["dec"])
    enc.eval()
    report["stages"]["autoencoder"] = st.info()

    latents = encode_latents(enc, rgbs[:8] if tiny else rgbs, cfg.size, 0 if tiny else 2, cfg.seed)
    st = Stage(work, "palette")
    if not st.done:
        st.dir.mkdir(parents=True, exist_ok=True)
        bounds = palette.group_bounds(latents.shape[1], groups)
        tables = palette.build_palette(latents, bounds, k0, cfg.n_levels, seed=cfg.seed)
        np.savez(st.dir / "palette.npz", **tables)
        st.finish({"level_sizes": tables["level_sizes"].tolist()})
    tables = dict(np.load(st.dir / "palette.npz"))
    report["stages"]["palette"] = st.info()
    n_levels = len(tables["level_sizes"])

    st = Stage(work, "finetune")
    if not st.done:
        dec = finetune_generator(enc, dec, views, palette.torch_quantiser(tables), n_levels,
                                 finetune_minutes, cfg, steps=4 if tiny else 1_000_000)
        st.dir.mkdir(parents=True, exist_ok=True)
        torch.save(dec.state_dict(), st.dir / "decoder.pt")
        st.finish({"minutes": finetune_minutes})
    dec = ImageDecoder(cfg, n_levels)
    dec.load_state_dict(torch.load(st.dir / "decoder.pt", map_location="cpu", weights_only=True))
    dec.eval()
    report["stages"]["finetune"] = st.info()

    plain = latents[:: (1 if tiny else 3)]  # the plain letterbox views: what the edge codes
    maps = palette.index_maps(plain, tables)
    report["stages"]["context"] = context_stage(work, maps, tables)
    report["rate"] = jsonable(context.evaluate(tables, maps[:64], plain[:64]))
    report["train_minutes"] = (time.perf_counter() - t0) / 60
    return write_image_assets(out, enc, dec, tables, cfg, report, groups)


def write_image_assets(out: Path, enc: ImageEncoder, dec: ImageDecoder, tables: dict[str, np.ndarray],
                       cfg: ImageCodecConfig, report: dict[str, Any], groups: int) -> Path:
    """The assets folder, written atomically, in the files a feature codec's assets hold."""
    from palettelink.train.stages import jsonable

    def write(tmp: Path) -> None:
        torch.save(enc.state_dict(), tmp / "encoder.pt")
        torch.save(dec.state_dict(), tmp / "decoder.pt")
        np.savez_compressed(tmp / "palette.npz", **tables)
        rate = report.get("rate", {})
        sizes = [int(k) for k in tables["level_sizes"]]
        codec = {"latent_channels": cfg.z_channels, "stride": cfg.z_stride, "groups": groups,
                 "bottleneck": cfg.to_dict(), "level_sizes": sizes, "levels": list(range(len(sizes))),
                 "mean_bits": rate.get("bits_context"), "mean_bits_static": rate.get("bits_static"),
                 "mean_bpp": rate.get("bpp_context"), "palette_space": "raw", "entropy_model": "context",
                 "progressive": True}
        (tmp / "codec.json").write_text(json.dumps(codec, indent=2))
        (tmp / "training.json").write_text(json.dumps(jsonable(report), indent=2, default=str))
        split = {"after_layer": 0,
                 "tensors": [{"name": "image", "layer": 0, "shape": [3, cfg.size, cfg.size]}]}
        write_manifest(tmp, {"name": "image-palette", "version": "1", "split": split,
                             "detector_sha256": identity_source_sha256(cfg.size), "tables": ["palette.npz"]})

    return atomic_write_folder(out, write)
