"""PaletteLink: scalable edge-to-server feature compression.

The core package is imported by both the edge client and the server. The runtime modules here need
numpy, constriction and onnxruntime only; torch lives in ``palettelink.models``, ``palettelink.train``
and ``palettelink.bench``, which the edge never imports.
"""

__version__ = "0.1.0"
