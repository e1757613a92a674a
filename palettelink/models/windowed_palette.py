"""The server's palette decoder on the onnxruntime path (issue 17): the same symbols, the decoder
network run on the frame's own window of the latent (:mod:`palettelink.models.ultra_ort`), at int8
where the bundle measured the whole path agreeing with the torch one.

The stream is decoded exactly as :class:`PaletteDecoder` decodes it (bit-exact index maps, every
check); only the dequantised latent is cut to the window before ``decoder.onnx`` runs, so the crossing
tensors cover the window (``Decoded.window``) and the tail that reads them must know it (the server's
onnxruntime detect runner does; nothing else is given this decoder). Where the edge already coded only
the window (:mod:`palettelink.codecs.palette.window`), its latent is decoded as it is.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from palettelink import bitstream
from palettelink.bundle import Bundle
from palettelink.codecs import Decoded
from palettelink.codecs.palette import window as palette_window
from palettelink.codecs.palette.runtime import CODEC, PaletteDecoder
from palettelink.front import GraphChoice
from palettelink.models.ultra_ort import choose_server_graph, server_session


class WindowedPaletteDecoder(PaletteDecoder):
    """:class:`PaletteDecoder` whose network runs on the frame's window of the latent (``window``
    False: the whole latent, as the base class) with the server's precision choice
    (:func:`palettelink.models.ultra_ort.choose_server_graph`)."""

    def __init__(self, bundle: Bundle, threads: int | None = None, precision: str | None = None,
                 window: bool = True) -> None:
        super().__init__(bundle, threads, precision=precision)
        zin = next(i for i in self.session.get_inputs() if i.name == "z")
        dynamic = not all(isinstance(d, int) for d in list(zin.shape)[-2:])
        self.align = palette_window.alignment(bundle)
        self.window = bool(window and dynamic and self.latent_hw is not None)

    def _choose_graph(self, bundle: Bundle, precision: str | None) -> GraphChoice:
        graph = str(bundle.codecs.get(CODEC, {}).get("decoder", "decoder.onnx"))
        return choose_server_graph(bundle, graph, precision)  # int8 where the build kept it

    def _open(self, path: str, threads: int | None) -> Any:
        return server_session(path, threads)  # idle threads sleep

    def latent(self, frame: bitstream.Frame, generate_to: int | None = None
               ) -> tuple[np.ndarray, int, int, tuple[int, int, int, int] | None]:
        """The frame's dequantised latent cut to its window: (z, level, sent level, window box or
        None for the whole latent). The symbols are decoded and checked as the base class does."""
        r = self.decode_indices(frame, generate_to)
        if not self.window:  # whole squares, as the base class (a window the edge sent is placed)
            return self.tables.dequantise(self.square_indices(frame, r), r.level), r.level, r.sent_level, None
        z = self.tables.dequantise(r.indices, r.level)
        sent = self.window_of(frame)
        if sent is not None:  # the edge coded the window: decode it as it is
            return z, r.level, r.sent_level, sent.box()
        box = None
        win = palette_window.frame_window(self.bundle, frame.image_size)
        if win is not None and tuple(z.shape[-2:]) == self.latent_hw:  # a letterboxed square: cut it
            rows, cols = win.cells(self.bundle.input_size // z.shape[-1])
            z = np.ascontiguousarray(z[:, :, rows, cols])
            box = win.box()
        return z, r.level, r.sent_level, box

    def decode_frame(self, frame: bitstream.Frame, n_bytes: int, generate_to: int | None = None) -> Decoded:
        t0 = time.perf_counter()
        z, level, sent, box = self.latent(frame, generate_to)
        t1 = time.perf_counter()
        outs = self.session.run(self.outputs, {"z": z, "level": np.asarray(level, dtype=np.int64)})
        t2 = time.perf_counter()
        tensors = [np.asarray(o, dtype=np.float32) for o in outs]
        return Decoded(tensors, CODEC, sent, frame.image_size, n_bytes, frame.truncated,
                       {"decode_ms": (t1 - t0) * 1e3, "decoder_ms": (t2 - t1) * 1e3,
                        "generated_level": float(level)}, window=box)
