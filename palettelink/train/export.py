"""ONNX graphs of the palette codec and their installation into a bundle (CONTRACTS "Palette codec").

- ``edge.onnx``: ``images`` [1,3,S,S] f32 + ``level`` int64 [] → ``indices`` int32 [G,h,w]:
  front → bottleneck encoder → per channel group: optional linear embedding head → nearest entry
  (argmin of squared distance to ``g{g}_search``) → ``g{g}_ancestor[level]``. One graph, so the edge
  never holds codec logic of its own (DESIGN §2, "one implementation of each thing"). A second
  output ``novelty`` f32 [] is the mean squared distance per channel from each latent vector to its
  nearest entry (averaged over groups): how far the frame lies from what the palette learned
  (``palettelink.train.levels.novelty_of`` is its numpy twin; the threshold is calibrated there).
- ``decoder.onnx``: ``z`` [1,C,h,w] f32 + ``level`` int64 [] → the crossing tensors, named like
  ``front.onnx``'s outputs, so the server can swap it in for the front's outputs.

The distance drops the ‖v‖² term (constant per position, it cannot change the argmin) and computes
‖s‖² − 2·v·s, which is what the torch reference :class:`EdgeGraph` does too.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from palettelink.bundle import read_manifest, verify_files
from palettelink.codecs.palette.window import alignment_for
from palettelink.errors import BundleError
from palettelink.train.bottleneck import BottleneckConfig, Decoder, Encoder

OPSET = 17


def _groups(tables: Mapping[str, np.ndarray]) -> list[tuple[int, int]]:
    g = np.asarray(tables["groups"]).astype(int)
    return [(int(a), int(b)) for a, b in zip(g[:-1], g[1:], strict=True)]


class EdgeGraph(nn.Module):
    """Torch reference of ``edge.onnx`` (exported as is)."""

    def __init__(self, det: Any, enc: Encoder, tables: Mapping[str, np.ndarray]) -> None:
        super().__init__()
        self.det = det
        self.front_layers = nn.ModuleList(det.layers[: det.split + 1])  # registered for export
        self.enc = enc
        self.bounds = _groups(tables)
        self.n_levels = int(np.asarray(tables["level_sizes"]).size)
        self.has_embed = [f"g{g}_embed_w" in tables for g in range(len(self.bounds))]
        # channels of each group's search space (the embedding's output width where there is one)
        self.dims = [float(np.asarray(tables[f"g{g}_search"]).shape[1]) for g in range(len(self.bounds))]
        for g in range(len(self.bounds)):
            s = torch.as_tensor(np.asarray(tables[f"g{g}_search"], np.float32))
            self.register_buffer(f"search{g}", s)
            self.register_buffer(f"snorm{g}", (s.double() ** 2).sum(1).float())
            anc = np.asarray(tables[f"g{g}_ancestor"]).astype(np.int64)
            if anc.shape != (self.n_levels, s.shape[0]):
                want = (self.n_levels, s.shape[0])
                raise BundleError(f"g{g}_ancestor has shape {anc.shape}, expected {want}")
            self.register_buffer(f"anc{g}", torch.as_tensor(anc))
            if self.has_embed[g]:
                for key, name in (("ew", "embed_w"), ("eb", "embed_b")):
                    arr = np.asarray(tables[f"g{g}_{name}"], np.float32)
                    self.register_buffer(f"{key}{g}", torch.as_tensor(arr))

    def nearest(self, z: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """z [1,C,h,w] → (finest-palette index per group, [h*w] int64 each; novelty, a 0-d tensor)."""
        c, h, w = z.shape[1:]
        v_all = z.reshape(c, h * w).transpose(0, 1)  # [hw, C]
        out = []
        novelty = torch.zeros(())
        for g, (a, b) in enumerate(self.bounds):
            v = v_all[:, a:b]
            if self.has_embed[g]:
                v = v @ getattr(self, f"ew{g}").transpose(0, 1) + getattr(self, f"eb{g}")
            dot = v @ getattr(self, f"search{g}").transpose(0, 1)
            d = getattr(self, f"snorm{g}").unsqueeze(0) - 2.0 * dot
            best = torch.min(d, dim=1)
            out.append(best.indices)
            dist = torch.clamp(best.values + (v * v).sum(1), min=0.0)
            novelty = novelty + dist.mean() / self.dims[g]
        return out, novelty / float(len(self.bounds))

    def forward(self, images: torch.Tensor, level: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.enc(self.det.front(images))
        h, w = z.shape[2], z.shape[3]
        lv = torch.clamp(level.reshape(1), 0, self.n_levels - 1)
        maps = []
        nearest, novelty = self.nearest(z)
        for g, idx in enumerate(nearest):
            row = torch.index_select(getattr(self, f"anc{g}"), 0, lv).reshape(-1)  # [K0]
            maps.append(torch.gather(row, 0, idx).reshape(h, w))
        return torch.stack(maps).to(torch.int32), novelty


class _DecoderGraph(nn.Module):
    def __init__(self, dec: Decoder) -> None:
        super().__init__()
        self.dec = dec

    def forward(self, z: torch.Tensor, level: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.dec(z, level))


def _export(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, inputs: list[str],
            outputs: list[str], dynamic: dict[str, dict[int, str]] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(module.eval(), args, str(path), input_names=inputs, output_names=outputs,
                          opset_version=OPSET, dynamic_axes=dynamic, dynamo=False)


def export_edge_onnx(det: Any, enc: Encoder, tables: Mapping[str, np.ndarray], path: str | Path,
                     size: int | None = None) -> Path:
    """Write ``edge.onnx`` (see module docstring), traced at ``size``² (default enc.cfg.size) with
    height and width dynamic: the edge runs it on the letterbox's whole square or on the frame's
    window of it (:func:`palettelink.codecs.palette.window.frame_window`), any multiple of the
    detector's coarsest stride."""
    s = int(size or enc.cfg.size)
    g = EdgeGraph(det, enc.eval(), tables).eval()
    dyn = {"images": {2: "height", 3: "width"}, "indices": {1: "h", 2: "w"}}
    _export(g, (torch.zeros(1, 3, s, s), torch.tensor(0, dtype=torch.int64)), Path(path),
            ["images", "level"], ["indices", "novelty"], dyn)
    return Path(path)


def export_decoder_onnx(dec: Decoder, path: str | Path,
                        cfg: BottleneckConfig | Mapping[str, Any] | None = None,
                        names: Sequence[str] = ("t4", "t6", "t9")) -> Path:
    """Write ``decoder.onnx``: z [1,C,h,w] + level int64 [] → crossing tensors ``names``.

    h, w are dynamic (the decoder is fully convolutional); level < 0 selects the unquantised path.
    """
    if isinstance(cfg, BottleneckConfig) or hasattr(cfg, "z_stride"):
        c = cfg  # type: ignore[assignment]
    else:
        c = BottleneckConfig.from_dict(dict(cfg)) if cfg else dec.cfg
    h = c.size // c.z_stride
    dyn = {"z": {2: "h", 3: "w"}, **{n: {2: f"{n}_h", 3: f"{n}_w"} for n in names}}
    args = (torch.zeros(1, c.z_channels, h, h), torch.tensor(-1, dtype=torch.int64))
    _export(_DecoderGraph(dec.eval()), args, Path(path), ["z", "level"], list(names), dyn)
    return Path(path)


class _TailGraph(nn.Module):
    """The detector's layers after the split on the crossing tensors → ``preds`` [B, 4+nc, anchors]
    (boxes xywh in network pixels, class probabilities): what :meth:`SplitDetector.tail` returns."""

    def __init__(self, det: Any) -> None:
        super().__init__()
        self.det = det
        self.tail_layers = nn.ModuleList(det.layers[det.split + 1:])  # registered for export

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.det.tail(list(tensors))


def export_tail_onnx(det: Any, path: str | Path, names: Sequence[str],
                     shapes: Sequence[Sequence[int]]) -> Path:
    """Write ``tail.onnx``: the crossing tensors ``names`` (C×h×w ``shapes`` at the bundle's input
    size) → ``preds`` [B, 4+nc, A], for onnxruntime on the server (issue 17).

    Batch, h and w are dynamic: the head's anchor grid is computed in the graph from the tensors'
    shapes (ultralytics' ``Detect.dynamic``), so the server may run the tail on a window of the
    letterboxed input (the frame's own rows, stride-aligned) or on a batch of frames."""
    head = det.layers[-1]
    saved = (getattr(head, "dynamic", False), getattr(head, "export", False), getattr(head, "shape", None))
    dyn = {n: {0: "batch", 2: f"{n}_h", 3: f"{n}_w"} for n in names}
    dyn["preds"] = {0: "batch", 2: "anchors"}
    args = tuple(torch.zeros(1, *(int(v) for v in s)) for s in shapes)
    try:
        head.dynamic, head.export, head.shape = True, True, None
        _export(_TailGraph(det), args, Path(path), list(names), ["preds"], dyn)
    finally:
        head.dynamic, head.export, head.shape = saved
    return Path(path)


def verify_tail_onnx(det: Any, path: str | Path, inputs: Sequence[Sequence[torch.Tensor]]) -> float:
    """Largest difference between ``tail.onnx`` (onnxruntime) and the torch tail over ``inputs``
    (lists of crossing tensors, any window), relative to max(1, |torch|) (box coordinates run to the
    input size, probabilities to 1); BundleError above 1e-4."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    worst = 0.0
    with torch.inference_mode():
        for ts in inputs:
            ref = det.tail([t.clone() for t in ts]).numpy()
            got = sess.run(None, {n: t.numpy() for n, t in zip(names, ts, strict=True)})[0]
            if got.shape != ref.shape:
                raise BundleError(f"tail.onnx gives {got.shape} where the torch tail gives {ref.shape}")
            worst = max(worst, float(np.max(np.abs(got - ref) / np.maximum(1.0, np.abs(ref)))))
    if worst > 1e-4:
        raise BundleError(f"tail.onnx differs from the torch tail by {worst:.3g} (relative, > 1e-4)")
    return worst


def install_server_graphs(det: Any, bundle_dir: str | Path, names: Sequence[str],
                          shapes: Sequence[Sequence[int]], samples: Sequence[np.ndarray]) -> dict[str, Any]:
    """Export ``tail.onnx`` into ``bundle_dir`` and check it against the torch tail on the front's
    tensors of ``samples`` (letterboxed 1×3×S×S inputs), whole and cut to a 640×480 frame's window.
    Returns the manifest's ``serve`` entry (:mod:`palettelink.models.ultra_ort`)."""
    from palettelink.image import content_window
    from palettelink.models.ultra_ort import TAIL

    dest = Path(bundle_dir)
    export_tail_onnx(det, dest / TAIL, names, shapes)
    size = int(samples[0].shape[-1]) if samples else 640
    align = max(size // int(s[2]) for s in shapes)
    win = content_window((4 * size, 3 * size), size, align)
    inputs = []
    with torch.inference_mode():
        for x in samples:
            ts = det.front(torch.from_numpy(np.ascontiguousarray(x, np.float32)))
            inputs.append(ts)
            inputs.append([t[:, :, slice(*(v // (size // t.shape[-1]) for v in (win.y0, win.y1))),
                             slice(*(v // (size // t.shape[-1]) for v in (win.x0, win.x1)))].contiguous()
                           for t in ts])
    diff = verify_tail_onnx(det, dest / TAIL, inputs) if inputs else None
    return {"runtime": "onnxruntime",
            "tail": {"file": TAIL, "inputs": list(names), "outputs": ["preds"],
                     "dynamic": ["batch", "height", "width"], "verified_max_rel_diff": diff},
            "window": {"align": align}}


# --------------------------------------------------------------------------------------------------
# install


def _bottleneck_config(codec: Mapping[str, Any], det: Any, size: int,
                       enc_sd: Mapping[str, torch.Tensor]) -> BottleneckConfig:
    """The architecture: codec.json's "bottleneck" block, else derived from the detector + weights."""
    if isinstance(codec.get("bottleneck"), Mapping):
        return BottleneckConfig.from_dict(dict(codec["bottleneck"]))
    mix = sorted((k for k in enc_sd if k.startswith("mix.") and k.endswith(".weight")),
                 key=lambda k: int(k.split(".")[1]))
    if not mix:
        raise BundleError("encoder.pt is not a bottleneck Encoder state dict")
    return BottleneckConfig.for_detector(det, size, z_channels=int(enc_sd[mix[-1]].shape[0]),
                                         z_stride=int(codec.get("stride", 16)))


def load_codec_models(assets_dir: str | Path, det: Any, size: int = 640,
                      codec: Mapping[str, Any] | None = None) -> tuple[Encoder, Decoder, BottleneckConfig]:
    """Encoder/decoder of an assets folder (state dicts + codec.json), eval mode, on CPU."""
    assets = Path(assets_dir)
    codec = codec if codec is not None else json.loads((assets / "codec.json").read_text())
    enc_sd = torch.load(assets / "encoder.pt", map_location="cpu", weights_only=True)
    dec_sd = torch.load(assets / "decoder.pt", map_location="cpu", weights_only=True)
    if (codec.get("bottleneck") or {}).get("arch") == "image":  # the image bundle's pixel autoencoder
        from palettelink.train.image_codec import ImageCodecConfig, ImageDecoder, ImageEncoder

        icfg = ImageCodecConfig.from_dict(dict(codec["bottleneck"]))
        ienc, idec = ImageEncoder(icfg), ImageDecoder(icfg, int(dec_sd["level_emb.weight"].shape[0]) - 1)
        ienc.load_state_dict(enc_sd)
        idec.load_state_dict(dec_sd)
        return ienc.eval(), idec.eval(), icfg  # type: ignore[return-value]
    cfg = _bottleneck_config(codec, det, size, enc_sd)
    enc = Encoder(cfg)
    enc.load_state_dict(enc_sd)
    dec = Decoder(cfg, int(dec_sd["level_emb.weight"].shape[0]) - 1)
    dec.load_state_dict(dec_sd)
    return enc.eval(), dec.eval(), cfg


def verify_assets(assets_dir: str | Path, detector_sha256: str | None,
                  split: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Check the assets' manifest: every listed file present with its sha256, made for these detector
    weights (and split, when both say). Returns the assets manifest; raises BundleError otherwise."""
    assets = Path(assets_dir)
    am = read_manifest(assets / "manifest.json", BundleError(
        f"codec assets {assets} have no manifest.json (write them with `palettelink train`)"))
    files = am.get("files") or {}
    for need in ("codec.json", "encoder.pt", "decoder.pt", "palette.npz"):
        if need not in files:
            raise BundleError(f"codec assets {assets}: manifest does not list {need}")
    verify_files(assets, files, f"codec assets {assets}")
    trained_for = am.get("detector_sha256")
    if not trained_for:
        raise BundleError(f"codec assets {assets}: manifest lacks detector_sha256")
    if detector_sha256 and trained_for != detector_sha256:
        raise BundleError(f"codec assets {assets} were trained for detector weights sha256 "
                          f"{trained_for[:16]}…, this bundle's weights are {detector_sha256[:16]}…; "
                          "retrain with `palettelink train`")
    if split is not None and am.get("split") is not None and am["split"] != split:
        raise BundleError(f"codec assets {assets} were trained for another split ({am['split']}) than the "
                          f"bundle's ({split})")
    return am


def grey_latent(edge_onnx: str | Path, size: int, align: int, latent_stride: int,
                calibration: Sequence[np.ndarray] = ()) -> dict[str, Any]:
    """What a window latent needs from the bundle (:mod:`palettelink.codecs.palette.window`).

    ``pad_indices``: the finest palette entry per group that ``edge.onnx`` gives the centre of the
    letterbox's grey (a square of 114): a server places a window among them.

    ``pad_novelty``: the novelty of the cells a window leaves out, which puts a window's novelty on
    the scale of the whole square's (the threshold's scale). Those cells are grey, but the ones next to
    the picture see it through the front's receptive field and sit further from the palette than the
    grey's interior (0.38 for the shipped codec, where the sample pictures' left-out cells average
    0.5–1.0). With ``calibration`` pictures (training images, never held-out ones) it is fitted to them:
    the least-squares value of p in ``square ≈ (n·window + (N − n)·p) / N`` over those whose window is
    not the whole square. Without, the grey square's own novelty.
    """
    import onnxruntime as ort

    from palettelink.image import content_window, letterbox

    sess = ort.InferenceSession(str(edge_onnx), providers=["CPUExecutionProvider"])
    level = np.asarray(0, np.int64)
    grey = np.full((1, 3, size, size), 114.0 / 255.0, np.float32)
    outs = sess.run(None, {"images": grey, "level": level})
    idx = np.asarray(outs[0])
    h, w = idx.shape[-2:]
    out: dict[str, Any] = {"pad_indices": [int(v) for v in idx.reshape(-1, h, w)[:, h // 2, w // 2]],
                           "pad_novelty": round(float(np.asarray(outs[1]).reshape(())), 6),
                           "pad_novelty_fit": "the grey square's own"}
    num = den = 0.0
    used = 0
    cells = (size // latent_stride) ** 2
    for rgb in calibration:
        x, lb = letterbox(rgb, size)
        win = content_window((lb.width, lb.height), size, align)
        n = ((win.x1 - win.x0) // latent_stride) * ((win.y1 - win.y0) // latent_stride)
        if n >= cells:
            continue
        square = float(np.asarray(sess.run(None, {"images": x, "level": level})[1]).reshape(()))
        crop = np.ascontiguousarray(x[:, :, win.y0:win.y1, win.x0:win.x1])
        window = float(np.asarray(sess.run(None, {"images": crop, "level": level})[1]).reshape(()))
        num += (cells * square - n * window) * (cells - n)
        den += float(cells - n) ** 2
        used += 1
    if den > 0:
        out["pad_novelty"] = round(num / den, 6)
        out["pad_novelty_fit"] = f"least squares over {used} training pictures"
    return out


def _calibration_pictures(n: int = 24) -> list[np.ndarray]:
    """Training pictures (never held-out ones) spread over the sources, where this machine has them."""
    from palettelink.train import data

    return data.load_all_rgb(data.spread(data.training_images(), n))


def install_palette_codec(det: Any, assets_dir: str | Path, bundle_dir: str | Path,
                          manifest: dict[str, Any]) -> dict[str, Any]:
    """Verify trained assets and build the palette codec into ``bundle_dir`` (CONTRACTS).

    Exports ``edge.onnx`` (at the bundle's input size) and ``decoder.onnx`` (outputs named like
    front.onnx's), copies ``palette.npz``, sets ``manifest["codecs"]["palette"]`` from codec.json and
    lists ``palette.npz`` in ``manifest["tables"]``. The caller writes the manifest (sha256s).
    Returns the palette codec entry.
    """
    assets, dest = Path(assets_dir), Path(bundle_dir)
    verify_assets(assets, (manifest.get("source") or {}).get("sha256"), manifest.get("split"))
    codec = json.loads((assets / "codec.json").read_text())
    size = int(manifest.get("input_size", 640))
    enc, dec, cfg = load_codec_models(assets, det, size, codec)
    with np.load(assets / "palette.npz") as z:
        tables = {k: z[k] for k in z.files}
    if int(np.asarray(tables["groups"])[-1]) != cfg.z_channels:
        raise BundleError(f"palette.npz covers {int(np.asarray(tables['groups'])[-1])} channels, "
                          f"the encoder makes {cfg.z_channels}")
    names = list((manifest.get("front") or {}).get("outputs") or [f"t{i}" for i in det.crossing])
    export_edge_onnx(det, enc, tables, dest / "edge.onnx", size)
    export_decoder_onnx(dec, dest / "decoder.onnx", cfg, names)
    shutil.copyfile(assets / "palette.npz", dest / "palette.npz")
    # The training weights travel with the bundle (server side), so `train --adapt BUNDLE` can start
    # from exactly what this bundle runs.
    (dest / "codec").mkdir(exist_ok=True)
    for name in ("codec.json", "encoder.pt", "decoder.pt", "training.json"):
        if (assets / name).is_file():
            shutil.copyfile(assets / name, dest / "codec" / name)
    level_sizes = [int(v) for v in np.asarray(tables["level_sizes"])]
    crossing = [int(t["shape"][-1]) for t in (manifest.get("split") or {}).get("tensors", [])]
    align = alignment_for(size, crossing, cfg.z_stride)  # what the bundle's window will be cut on
    pad = grey_latent(dest / "edge.onnx", size, align, cfg.z_stride, _calibration_pictures())
    entry = {k: v for k, v in codec.items() if k not in ("report", "training")}
    entry.update({"param": "level", "levels": codec.get("levels", list(range(len(level_sizes)))),
                  "level_sizes": level_sizes, "edge": "edge.onnx", "decoder": "decoder.onnx",
                  "tables": "palette.npz", "edge_files": ["edge.onnx", "palette.npz"],
                  "latent": [cfg.z_channels, size // cfg.z_stride, size // cfg.z_stride],
                  "group_offsets": [int(v) for v in np.asarray(tables["groups"])], **pad})
    manifest.setdefault("codecs", {})["palette"] = entry
    tables_list = manifest.setdefault("tables", [])
    if "palette.npz" not in tables_list:
        tables_list.append("palette.npz")
    edge_side = manifest.setdefault("sides", {}).setdefault("edge", [])
    edge_side.extend(f for f in entry["edge_files"] if f not in edge_side)
    return entry
