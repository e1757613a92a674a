"""Palette-diffusion codec runtime: nested index maps as an embedded, progressive stream (DESIGN §1, §3).

numpy + onnxruntime + constriction only (no torch): the edge and the server both import this package.
Split by concern: ``tables`` (palette.npz), ``context`` (the pass contexts), ``stream`` (layers and
whole streams, pure functions), ``runtime`` (edge encoder, server decoder, registry spec).

Levels: t = 0 is the finest palette (K0 entries per channel group), t = L-1 the coarsest. Every level-t
entry has exactly one parent at level t+1 (the Ward hierarchy), so a stream can be *embedded*:

- layer 0 codes the level L-1 index maps of all groups (as the refinement of a virtual one-entry
  root level L, so it shares the code below);
- layer i (i ≥ 1) codes level L-1-i given level L-i: per position the *rank* of its child among the
  parent's children (sorted by id; a parent has 1..M_t children, M_t the widest at that level).
  Positions whose parent has one child cost nothing and are not coded.

Any prefix of the layer list decodes exactly to a coarser level, and encoding level t directly gives
the same bytes as cutting the level-0 stream (each layer depends only on levels t and t+1).

Entropy models (integer tables frozen in ``palette.npz``, written by ``palettelink.train.context``):

- static: ``ctx_static_t{t}`` uint16 [G, K_{t+1}, M_t]: p(child rank | group, parent), the fallback;
- context (the backward diffusion p(level t | level t+1, decoded neighbours)): each layer is coded in
  five passes over a 4×4 lattice (coarse to fine, like a 2-level checkerboard), every pass
  conditioned on the parent map and on the passes before it:

  ====  ==========================  ======================================================
  pass  positions (y, x mod 4)      context (table ``ctx_{pass}_t{t}``)
  ====  ==========================  ======================================================
  a     (0, 0)              (1/16)  :func:`anchor_context`: 4- and diagonal neighbours sharing
                                    the parent ([G, K_{t+1}, N_A, M_t])
  e     (2, 2)              (1/16)  :func:`neighbour_context`, diagonal neighbours at distance 2
                                    (all pass a) ([G, K_{t+1}, N_NC·M_t, M_t], also f, d, b)
  f     (0, 2), (2, 0)      (1/8)   edge neighbours at distance 2 (passes a, e)
  d     (odd, odd)          (1/4)   diagonal neighbours (all even-even: passes a, e, f)
  b     y + x odd           (1/2)   edge neighbours (passes a, e, f, d)
  ====  ==========================  ======================================================

  ``neighbour_context``: among the decoded neighbours with the same parent, their number n, the mode
  child rank m and its count c (11 (n, c) pairs × m). Measured on bottleneck latents, blind positions
  cost ~0.97 bits, diagonal-context ones ~0.60, edge-context ones ~0.30: the fewer blind positions
  the better, so the plain checkerboard (half blind) became this lattice (1/16 blind).

Every row sums to 2**16 (``entropy.normalise_counts``); turning a row into probabilities is one exact
division, so decoding is bit-exact on any machine. Tables absent from the file fall back to uniform
static tables derived from the hierarchy, so a palette without ``ctx_*`` keys still codes.

One ANS stream per layer holds the passes of all groups in order (one flush per layer, not per pass).
Generative refinement (server, optional): the same models fill in unsent finer levels, by argmax or by
seeded sampling (integer CDFs and numpy's PCG64, so also reproducible everywhere).
"""

from palettelink.codecs.palette.context import (
    _NC_INDEX,
    anchor_context,
    neighbour_context,
    pass_context,
    pass_masks,
)
from palettelink.codecs.palette.runtime import (
    CODEC,
    FLAG_STATIC,
    SPEC,
    WIRE_ID,
    PaletteAnalysis,
    PaletteDecoder,
    PaletteEncoder,
)
from palettelink.codecs.palette.stream import (
    GENERATE_MODES,
    MAX_POSITIONS,
    DecodedIndices,
    decode_layer,
    decode_layers,
    decode_layers_full,
    encode_layer,
    encode_levels,
    encode_levels_between,
    generate_layer,
    layer_bits,
    mean_level_bits,
)
from palettelink.codecs.palette.tables import (
    CTX_FORMAT,
    MODELS,
    N_A,
    N_NC,
    PASSES,
    PROB_TOTAL,
    TABLES_FILE,
    PaletteTables,
    check_model,
)

__all__ = ["CODEC", "CTX_FORMAT", "FLAG_STATIC", "GENERATE_MODES", "MAX_POSITIONS", "MODELS", "N_A", "N_NC",
           "PASSES", "PROB_TOTAL", "SPEC", "TABLES_FILE", "WIRE_ID", "_NC_INDEX", "DecodedIndices",
           "PaletteAnalysis", "PaletteDecoder", "PaletteEncoder", "PaletteTables", "anchor_context",
           "check_model", "decode_layer", "decode_layers", "decode_layers_full", "encode_layer",
           "encode_levels", "encode_levels_between", "generate_layer", "layer_bits", "mean_level_bits",
           "neighbour_context", "pass_context", "pass_masks"]
