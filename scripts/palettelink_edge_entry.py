"""Entry point of the one-file ``palettelink-edge`` binary (``scripts/build-edge-binary.sh``).

PyInstaller needs a script, not a ``module:function`` console-script spec; this is that script and
nothing else, so ``edge/client.py`` stays the one place the client lives.
"""

import sys

from edge.client import main

if __name__ == "__main__":
    sys.exit(main())
