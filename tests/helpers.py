"""What several test files need to run the project's own programs: the installed console scripts,
an environment without the developer's tokens, a loader for the repository's scripts/ modules, a
prelude that hides the heavy training packages from a child process (the edge install has none), and
an image bomb for the upload limits."""

from __future__ import annotations

import importlib.util
import os
import struct
import sys
import zlib
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TOKEN_VARIABLES = ("PALETTELINK_TOKEN", "PALETTELINK_TOKENS")

# Run before a child's own code (python -c ABSENT_PRELUDE + ...): importing torch, torchvision or
# ultralytics then fails as on an edge-only install.
ABSENT_PRELUDE = '''
import sys


class _Absent:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "ultralytics"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _Absent)
'''


def script(name: str) -> list[str]:
    """The installed console script (what users run); ``python -m`` only if it is not installed."""
    exe = BIN / name
    if exe.is_file():
        return [str(exe)]
    module = {"palettelink-edge": "edge.client", "palettelink-server": "server.main"}[name]
    return [sys.executable, "-m", module]


def env(drop: tuple[str, ...] = (), **extra: str) -> dict[str, str]:
    """This process's environment without tokens (and without ``drop``), plus ``extra``."""
    e = {k: v for k, v in os.environ.items() if k not in (*TOKEN_VARIABLES, *drop)}
    e.update(extra)
    return e


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def blank_png(width: int, height: int) -> bytes:
    """A valid 1-bit all-zero PNG of ``width``×``height``: 8192² compresses to ~100 KB and would decode
    to 200 MB of BGR (an image bomb), so upload limits must refuse it from its header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = b"\x00" + bytes((width + 7) // 8)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
