"""The bottleneck's training loops: :func:`train_bottleneck` (encoder + decoder, unquantised
level, z perturbed) and :func:`finetune_decoder` (the level-conditioned decoder on palette-decoded z,
encoder frozen), both over the losses of :mod:`palettelink.train.distill`.

Training works on random aligned windows of cached crossing tensors
(:class:`palettelink.train.crossing_cache.CrossingCache`) so a CPU run of ~15 min gives a useful model.
"""

from __future__ import annotations

import copy
import io
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from palettelink.bundle import atomic_write_bytes
from palettelink.errors import InvalidRequest
from palettelink.train.bottleneck import (
    BottleneckConfig,
    Decoder,
    Encoder,
    QuantiseFn,
    as_bottleneck_config,
    encode_latents,
    grow_decoder,
    grow_encoder,
    load_models,
    n_params,
    save_json,
    save_models,
    sync_level_rows,
)
from palettelink.train.crossing_cache import CrossingCache
from palettelink.train.distill import (
    device_of,
    head_of,
    measure_sensitivity,
    perturb_latent,
    reset_anchors,
    sensitivity_weights,
    step_losses,
)


def _lr_at(cfg: BottleneckConfig, progress: float, step: int) -> float:
    warm = min(1.0, (step + 1) / max(cfg.warmup, 1))
    cos = cfg.lr_min_frac + (1 - cfg.lr_min_frac) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * warm * cos


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


MEASURED_FIELDS = ("tensor_weights",)  # set from a measurement when a run starts, not by the caller


def same_run(state: dict[str, Any], cfg: BottleneckConfig, steps: int) -> bool:
    """Whether checkpoint ``state`` is of the run that ``cfg`` and ``steps`` ask for, so training resumes
    from it: the same config but for the fields the run measured at its start (the sensitivity
    weights: the checkpoint's are the run's, a fresh config has the defaults)."""
    # fields a saved config lacks (added since) take their defaults, as from_dict reads them
    saved, want = BottleneckConfig.from_dict(dict(state.get("cfg") or {})).to_dict(), cfg.to_dict()
    for k in MEASURED_FIELDS:
        saved.pop(k, None)
        want.pop(k, None)
    return saved == want and state.get("steps") == steps


def train_bottleneck(det: Any, cache: CrossingCache, cfg: BottleneckConfig | Any = None,
                     steps: int | str | Path | None = None, out: str | Path | None = None,
                     minutes: float | None = None, log_every: int = 50, ckpt_every_s: float = 120.0,
                     progress: bool = True, sensitivity: bool = True, init: str | Path | None = None,
                     snapshot_every_s: float = 0.0) -> tuple[Encoder, Decoder]:
    """Train encoder + decoder by distillation from ``det`` on ``cache``; return them in eval mode.

    Stops after ``steps`` or ``minutes`` (whichever first; the cosine LR follows whichever budget is
    tighter, so a time-limited run still anneals). With ``out``, writes ``checkpoint.pt`` (resumed
    when present and made with the same config), ``encoder.pt``/``decoder.pt`` (state dicts),
    ``config.json`` and ``train_log.json``. Exact reproducibility needs ``minutes=None``.
    ``init``: a folder of :func:`save_models` to warm-start from (same architecture), e.g. to
    continue a CPU run with more time or another loss mix.
    ``snapshot_every_s`` > 0 (with ``out``): at most that often, at a checkpoint, also keep the models
    alone as ``<out>/../snapshots/<out name>-cpu<seconds>.pt``, named by the CPU seconds of the training
    process (carried across resumes), for the held-out curve (:mod:`palettelink.train.curve`).
    """
    from tqdm import tqdm

    if isinstance(steps, str | Path):  # called as train_bottleneck(det, cache, cfg, out)
        steps, out = None, steps
    if not isinstance(cfg, BottleneckConfig) and cfg is not None:  # a pipeline config
        minutes = minutes if minutes is not None else getattr(cfg, "bottleneck_minutes", None)
        if getattr(cfg, "tiny", False):
            steps, minutes, sensitivity = steps or 3, None, False
    if steps is None:
        steps = 100_000 if minutes else 2000
    cfg = as_bottleneck_config(cfg, det, cache.size)
    if len(cfg.tensor_weights) != len(cfg.in_channels):
        raise InvalidRequest(f"{len(cfg.tensor_weights)} tensor weights for {len(cfg.in_channels)} crossing "
                             f"tensors: give one per tensor, finest first")
    n_classes = int(getattr(head_of(det), "nc", 0) or 0)
    if cfg.class_weights is not None and n_classes and len(cfg.class_weights) != n_classes:
        raise InvalidRequest(f"{len(cfg.class_weights)} class weights for a detector of {n_classes} classes: "
                             f"give one per class, in the detector's class order")
    dev = device_of(det)
    outp = Path(out) if out else None
    if outp:
        outp.mkdir(parents=True, exist_ok=True)
    _seed_all(cfg.seed)
    ckpt = outp / "checkpoint.pt" if outp else None
    state: dict[str, Any] | None = None
    if ckpt and ckpt.is_file():
        state = torch.load(ckpt, map_location=dev, weights_only=False)
        if not same_run(state, cfg, steps):
            state = None  # another run's checkpoint: start over
    if state is None and sensitivity:
        sens = measure_sensitivity(det, cache)
        cfg.tensor_weights = sensitivity_weights(sens)
    enc, dec = Encoder(cfg).to(dev), Decoder(cfg).to(dev)
    stats = cache.channel_stats()
    enc.set_stats(stats)
    dec.set_stats(stats)
    if init is not None and state is None:
        enc0, dec0 = load_models(init, dev)
        grow_encoder(enc, enc0)  # the same latent, or a wider one whose first channels are as they were
        grow_decoder(dec, dec0)  # the same decoder, or a deeper/wider one that starts decoding as it did
    params = list(enc.parameters()) + list(dec.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr)
    step, elapsed, log, cpu_before = 0, 0.0, [], 0.0
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    report: dict[str, Any] = {}
    if state is not None:
        cfg = BottleneckConfig.from_dict(state["cfg"])
        enc.load_state_dict(state["enc"])
        dec.load_state_dict(state["dec"])
        opt.load_state_dict(state["opt"])
        step, elapsed, log = state["step"], state["elapsed"], state["log"]
        cpu_before = float(state.get("cpu_s", 0.0))
        rng.bit_generator.state = state["rng"]
        gen.set_state(state["gen"])
        report = state.get("report", {})
    else:
        report = {"sensitivity": sens if sensitivity else None, "tensor_weights": cfg.tensor_weights}
    resumed = state is not None
    if ckpt and state is None:
        state = {}
    reset_anchors(det)
    enc.train()
    dec.train()
    budget_s = minutes * 60 if minutes else None

    # CPU seconds of the training process, what the held-out curve plots: a fresh run counts what the
    # process spent before it (cache building, an earlier stage); a resumed one adds to its checkpoint's.
    cpu_start = time.process_time() if resumed else 0.0
    last_snapshot = -float("inf")

    def save() -> None:
        nonlocal last_snapshot
        if not ckpt:
            return
        now = {"cfg": cfg.to_dict(), "steps": steps, "enc": enc.state_dict(), "dec": dec.state_dict(),
               "opt": opt.state_dict(), "step": step, "elapsed": elapsed, "log": log,
               "cpu_s": cpu_before + time.process_time() - cpu_start,
               "rng": rng.bit_generator.state, "gen": gen.get_state(), "report": report}
        torch.save(now, ckpt)
        if snapshot_every_s > 0 and time.perf_counter() - last_snapshot >= snapshot_every_s:
            buf = io.BytesIO()  # the models alone: no optimiser state, a third of the checkpoint
            torch.save({k: now[k] for k in ("cfg", "enc", "dec", "step", "elapsed", "cpu_s")}, buf)
            name = f"{ckpt.parent.name}-cpu{int(now['cpu_s'])}.pt"
            atomic_write_bytes(ckpt.parent.parent / "snapshots" / name, buf.getvalue())
            last_snapshot = time.perf_counter()

    bar = tqdm(total=steps, initial=step, desc="bottleneck", unit="step", disable=not progress)
    t_start, t_ckpt = time.perf_counter() - elapsed, time.perf_counter()
    run: dict[str, float] = {}
    while step < steps:
        elapsed = time.perf_counter() - t_start
        progress_frac = max(step / steps, elapsed / budget_s if budget_s else 0.0)
        if progress_frac >= 1.0:
            break
        for g in opt.param_groups:
            g["lr"] = _lr_at(cfg, progress_frac, step)
        idx = rng.integers(0, len(cache), cfg.batch)
        ts = cache.batch([int(i) for i in idx], crop=cfg.crop, rng=rng, device=dev)
        z = perturb_latent(enc(ts), cfg, gen)
        ramp = float(np.clip((progress_frac - cfg.task_start) / max(cfg.task_ramp, 1e-9), 0.0, 1.0))
        loss, logs = step_losses(det, dec, z, None, ts, cfg, ramp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        for k, v in logs.items():
            run[k] = run.get(k, 0.0) + v
        run["n"] = run.get("n", 0.0) + 1
        if step % log_every == 0 or step == steps:
            n = run.pop("n")
            entry = {"step": step, "s": round(time.perf_counter() - t_start, 1),
                     "lr": opt.param_groups[0]["lr"], **{k: round(v / n, 5) for k, v in run.items()}}
            log.append(entry)
            bar.set_postfix(loss=entry["loss"], cls=entry["cls"], nmse2=entry.get("nmse2"))
            run = {}
        bar.update(1)
        if ckpt and time.perf_counter() - t_ckpt > ckpt_every_s:
            elapsed = time.perf_counter() - t_start
            save()
            t_ckpt = time.perf_counter()
    bar.close()
    sync_level_rows(dec)
    elapsed = time.perf_counter() - t_start
    report.update({"steps_done": step, "train_s": round(elapsed, 1), "enc_params": n_params(enc),
                   "dec_params": n_params(dec), "final": log[-1] if log else None})
    save()
    enc.eval()
    dec.eval()
    if outp:
        save_models(enc, dec, outp, report={"log": log, **report})
    return enc, dec


def freeze_batchnorm(model: nn.Module) -> None:
    """BatchNorm layers to eval mode (running statistics frozen; affine weights still learn).

    Why: fine-tuning at a random palette level per step let every step overwrite the running
    statistics with those of its level's batch. Coarse levels give z of much smaller spread, so the
    frozen statistics after fine-tuning were a mixture that over-amplified the fine levels and the
    unquantised path: the shipped codec kept AP50 0.45 at level 0 and 0.95 at level 5 (same-site eval),
    and 0.32 for unquantised z. The level embedding (FiLM) is what adapts each level; the statistics
    stay those of the bottleneck's own training."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()


def finetune_decoder(det: Any, enc: Encoder, dec: Decoder, cache: CrossingCache, quantise_fn: QuantiseFn,
                     levels: Sequence[int], steps: int = 600, minutes: float | None = None,
                     lr: float = 5e-4, latents: np.ndarray | None = None, unquantised_frac: float = 0.1,
                     progress: bool = True, out: str | Path | None = None, seed: int | None = None,
                     recipe: Mapping[str, Any] | None = None, ema: float = 0.0) -> Decoder:
    """Fine-tune ``dec`` on palette-quantised z at every level in ``levels``; encoder frozen.

    z is computed once at full size (:func:`encode_latents`, or pass ``latents``), then each step
    takes aligned windows of z and the crossing tensors, picks a level (round-robin over a shuffled
    ``levels``; ``unquantised_frac`` of steps use level None so the unquantised path is kept),
    quantises with ``quantise_fn(z, level)`` and trains the decoder with the same losses as
    :func:`train_bottleneck`. Returns a new decoder (``dec`` is left as it was; resized to cover
    max(levels)+1 if needed) in eval mode.

    The run stops after ``steps`` or ``minutes``, whichever comes first, and the learning rate follows
    whichever is further along: a step budget (``minutes=None``) is what makes a run reproducible on
    another machine or beside other work. ``seed`` (default: the decoder's own) draws the batches and
    levels, and ``recipe`` overrides fields of the decoder's loss mix (``w_rank``, ``class_weights``...):
    a fine-tune of a copied bottleneck stage otherwise trains with that stage's seed and mix, whatever
    the run asked for.

    ``ema`` > 0 returns the exponential moving average of the decoder's weights over the run (decay
    ``ema`` per step; torch's ``AveragedModel``) instead of its last step: averaging along the trajectory
    (Polyak & Juditsky 1992; Izmailov et al. 2018) is the usual answer to fine-tunes that differ only in
    their draw of batches and land 0.025 AP50 apart on held-out sources, as this codec's do. Measured
    once (docs/TRAINING.md, e1): the training views gain, held-out sources do not. Batch-norm
    statistics are frozen here, so averaging the weights alone is exact.
    """
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    from tqdm import tqdm

    cfg = replace(dec.cfg, **dict(recipe or {}))
    dev = device_of(det)
    levels = [int(v) for v in levels]
    dec = dec.resized(max(levels) + 1) if levels and max(levels) >= dec.n_levels else copy.deepcopy(dec)
    dec.cfg = cfg
    dec = dec.to(dev).train()
    freeze_batchnorm(dec)
    averaged = AveragedModel(dec, multi_avg_fn=get_ema_multi_avg_fn(ema)) if ema > 0 else None
    enc.eval()
    z_all = latents if latents is not None else encode_latents(enc, cache, device=dev)
    seed = cfg.seed if seed is None else int(seed)
    rng = np.random.default_rng(seed + 1)
    opt = torch.optim.Adam(dec.parameters(), lr=lr)
    order: list[int] = []
    zs = cfg.z_stride
    reset_anchors(det)
    t0 = time.perf_counter()
    log: list[dict[str, float]] = []
    run: dict[str, float] = {}
    done = 0
    bar = tqdm(range(steps), desc="finetune decoder", unit="step", disable=not progress)
    for step in bar:
        prog = max(step / steps, (time.perf_counter() - t0) / (minutes * 60) if minutes else 0.0)
        if prog >= 1.0:
            break
        done = step + 1
        for g in opt.param_groups:
            g["lr"] = lr * (cfg.lr_min_frac + (1 - cfg.lr_min_frac) * 0.5 * (1 + math.cos(math.pi * prog)))
        if rng.random() < unquantised_frac or not levels:
            level: int | None = None
        else:
            if not order:
                order = list(rng.permutation(levels))
            level = int(order.pop())
        idx = [int(i) for i in rng.integers(0, len(cache), cfg.batch)]
        offs = cache.random_offsets(len(idx), cfg.crop, rng, indices=idx)
        ts = cache.batch(idx, crop=cfg.crop, device=dev, offsets=offs)
        c = min(cfg.crop, cache.size) // zs
        z = torch.from_numpy(np.stack([z_all[i, :, oy // zs:oy // zs + c, ox // zs:ox // zs + c]
                                       for i, (oy, ox) in zip(idx, offs, strict=True)])).to(dev)
        with torch.no_grad():
            zq = z if level is None else quantise_fn(z, level).to(dev, torch.float32)
        loss, logs = step_losses(det, dec, zq, level, ts, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dec.parameters(), 1.0)
        opt.step()
        if averaged is not None:
            averaged.update_parameters(dec)
        for k, v in logs.items():
            run[k] = run.get(k, 0.0) + v
        run["n"] = run.get("n", 0.0) + 1
        if (step + 1) % 50 == 0:
            n = run.pop("n")
            log.append({"step": step + 1, **{k: round(v / n, 5) for k, v in run.items()}})
            bar.set_postfix(loss=log[-1]["loss"])
            run = {}
    if averaged is not None and done:
        dec.load_state_dict(averaged.module.state_dict())
    dec.eval()
    if out:
        outp = Path(out)
        outp.mkdir(parents=True, exist_ok=True)
        torch.save(dec.state_dict(), outp / "decoder.pt")
        save_json(outp / "config.json", {**cfg.to_dict(), "decoder_n_levels": dec.n_levels})
        save_json(outp / "finetune_log.json", {"levels": levels, "log": log, "steps": done, "ema": ema,
                                                "seed": seed,
                                                "s": round(time.perf_counter() - t0, 1)})
    return dec
