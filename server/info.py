"""What a server tells about its bundles: each loaded bundle (:class:`LoadedBundle`: the bundle, its
decoder and one batching queue per task) and its description as ``GetInfo`` and ``/api/info`` give it
(:class:`BundleInfo`, with its codecs' levels as the manifest records them).
"""

from __future__ import annotations

from dataclasses import dataclass

from palettelink import codecs
from palettelink.bundle import Bundle
from palettelink.codecs.palette import window as palette_window
from palettelink.levels import codec_levels
from server.batching import Batcher


@dataclass(frozen=True)
class LevelInfo:
    level: int
    palette_size: int = 0
    mean_bits: float = 0.0
    mean_bpp: float = 0.0


@dataclass(frozen=True)
class CodecInfo:
    name: str
    levels: list[LevelInfo]
    progressive: bool = False
    window_latent: bool = False  # decodes a latent of the frame's window (palettelink.codecs.palette.window)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    layer: int
    shape: list[int]


@dataclass(frozen=True)
class BundleInfo:
    name: str
    version: str
    table_hash: str
    tasks: list[str]
    class_names: list[str]
    codecs: list[CodecInfo]
    tensors: list[TensorInfo]
    input_size: int


def codec_info(bundle: Bundle, name: str) -> CodecInfo:
    """A codec's levels as the core reads them from the manifest (``palettelink.levels.codec_levels``)."""
    entry = bundle.codecs.get(name, {})
    levels = [LevelInfo(int(lv["level"]), int(lv.get("palette_size") or 0), float(lv.get("mean_bits") or 0),
                        float(lv.get("mean_bpp") or 0)) for lv in codec_levels(bundle, name)]
    return CodecInfo(name, levels, bool(entry.get("progressive", False)),
                     palette_window.codec_codes_windows(bundle, name))


@dataclass
class LoadedBundle:
    bundle: Bundle
    decoder: codecs.Decoder
    batchers: dict[str, Batcher]

    @property
    def tasks(self) -> list[str]:
        return list(self.batchers)

    def info(self) -> BundleInfo:
        b = self.bundle
        return BundleInfo(
            name=b.name, version=b.version, table_hash=b.table_hash_hex, tasks=self.tasks,
            class_names=list(b.class_names),
            codecs=[codec_info(b, c) for c in codecs.available(b)],
            tensors=[TensorInfo(t.name, t.layer, list(t.shape)) for t in b.tensors],
            input_size=b.input_size,
        )


def version_key(version: str) -> tuple[int, int | str]:
    """Orders a bundle's versions: numbers by value, below any other name."""
    return (0, int(version)) if version.isdigit() else (1, version)
