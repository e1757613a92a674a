"""Read files out of a Qt resource bundle (``.rcc``), the container gcompris-qt-data ships its
pictures in. Format (Qt's rcc.cpp): a 20-byte header ``qres``, version, then offsets of the tree,
data and names sections. Each tree node is 14 bytes (+8 for a last-modified stamp from version 2):
name offset, flags, then either (child count, first child) for a directory or (country, language,
data offset) for a file. Flag 1 = zlib (4-byte big-endian size + a zlib stream), 4 = zstd.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

COMPRESSED, DIRECTORY, COMPRESSED_ZSTD = 0x01, 0x02, 0x04


class RccError(ValueError):
    """Not a Qt resource file, or one this reader cannot parse."""


def _name(buf: bytes, names: int, off: int) -> str:
    (length,) = struct.unpack_from(">H", buf, names + off)
    raw = buf[names + off + 6: names + off + 6 + 2 * length]
    return raw.decode("utf-16-be")


def iter_files(path: Path) -> Iterator[tuple[str, bytes]]:
    """Yield (resource path, file bytes) for every file in the bundle."""
    buf = Path(path).read_bytes()
    if buf[:4] != b"qres":
        raise RccError(f"{path}: not a Qt resource file")
    version, tree, data, names = struct.unpack_from(">IIII", buf, 4)
    node_size = 14 + (8 if version >= 2 else 0)

    def walk(index: int, prefix: str) -> Iterator[tuple[str, bytes]]:
        at = tree + index * node_size
        name_off, flags = struct.unpack_from(">IH", buf, at)
        name = "" if index == 0 else _name(buf, names, name_off)
        full = f"{prefix}/{name}" if name else prefix
        if flags & DIRECTORY:
            count, first = struct.unpack_from(">II", buf, at + 6)
            for child in range(first, first + count):
                yield from walk(child, full)
            return
        (data_off,) = struct.unpack_from(">I", buf, at + 10)
        (size,) = struct.unpack_from(">I", buf, data + data_off)
        blob = buf[data + data_off + 4: data + data_off + 4 + size]
        if flags & COMPRESSED:
            blob = zlib.decompress(blob[4:])
        elif flags & COMPRESSED_ZSTD:
            return  # not used by gcompris; skip rather than pull in zstd
        yield full, blob

    yield from walk(0, "")
