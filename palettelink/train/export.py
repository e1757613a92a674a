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

from palettelink.bundle import verify_files
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
    """Write ``edge.onnx`` (see module docstring) for square inputs of ``size`` (default enc.cfg.size)."""
    s = int(size or enc.cfg.size)
    g = EdgeGraph(det, enc.eval(), tables).eval()
    _export(g, (torch.zeros(1, 3, s, s), torch.tensor(0, dtype=torch.int64)), Path(path),
            ["images", "level"], ["indices", "novelty"])
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
    mpath = assets / "manifest.json"
    if not mpath.is_file():
        raise BundleError(f"codec assets {assets} have no manifest.json "
                          "(write them with `palettelink train`)")
    try:
        am = json.loads(mpath.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BundleError(f"unreadable codec assets manifest {mpath}: {e}") from e
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
    entry = {k: v for k, v in codec.items() if k not in ("report", "training")}
    entry.update({"param": "level", "levels": codec.get("levels", list(range(len(level_sizes)))),
                  "level_sizes": level_sizes, "edge": "edge.onnx", "decoder": "decoder.onnx",
                  "tables": "palette.npz", "edge_files": ["edge.onnx", "palette.npz"],
                  "latent": [cfg.z_channels, size // cfg.z_stride, size // cfg.z_stride],
                  "group_offsets": [int(v) for v in np.asarray(tables["groups"])]})
    manifest.setdefault("codecs", {})["palette"] = entry
    tables_list = manifest.setdefault("tables", [])
    if "palette.npz" not in tables_list:
        tables_list.append("palette.npz")
    edge_side = manifest.setdefault("sides", {}).setdefault("edge", [])
    edge_side.extend(f for f in entry["edge_files"] if f not in edge_side)
    return entry
