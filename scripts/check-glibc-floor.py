#!/usr/bin/env python3
"""The newest glibc an ELF file, a folder of them, or a PyInstaller one-file binary needs to start.

    python3 scripts/check-glibc-floor.py [--floor 2.31] [--json] PATH [PATH ...]

A dynamically linked ELF file names, in its version-needs table (``.gnu.version_r``), every symbol
version it requires from each shared library: ``GLIBC_2.34`` from ``libc.so.6`` means it will not load
on a glibc older than 2.34. This reads that table (stdlib only: no readelf, no pyelftools) from:

- each ELF file given, or found under a folder given;
- a PyInstaller one-file binary: its own bootloader and every ELF file in the archive it unpacks at
  start (libpython, the extension modules, the shared libraries collected with them), read from the
  CArchive appended to it.

It prints one line per ELF file (the newest GLIBC version it needs and the library it needs it from),
then, for each file above the floor, the symbols that need the too-new versions. Exit 0 when no file
needs a glibc newer than ``--floor`` (default 2.31: Ubuntu 20.04, Debian 11), 1 when one does (or needs
``GLIBC_PRIVATE``, which binds it to one glibc build), 2 on a usage error or a file that is not ELF
nor a one-file binary. ``--json`` prints one JSON object instead.

Requirements on libstdc++ (``GLIBCXX_*``) are listed too, and checked against ``--glibcxx-floor``
(default 3.4.28: GCC 10, Ubuntu 20.04's is 3.4.28) unless the archive bundles its own libstdc++.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import struct
import sys
import zlib
from pathlib import Path

ELF_MAGIC = b"\x7fELF"
SHT_DYNSYM = 11
SHT_GNU_VERNEED = 0x6FFFFFFE
SHT_GNU_VERSYM = 0x6FFFFFFF
VERSION_RE = re.compile(r"^(GLIBC|GLIBCXX|CXXABI)_(\d+(?:\.\d+)*)$")

# PyInstaller's CArchive (PyInstaller/archive/readers.py): a cookie at the end, a table of contents.
COOKIE_MAGIC = b"MEI\014\013\012\013\016"
COOKIE_FORMAT = "!8sIIII64s"
TOC_ENTRY_FORMAT = "!IIIIBc"


def version_key(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


class ElfNeeds:
    """What one ELF file requires: {library: {version name: [symbols]}}."""

    def __init__(self, name: str):
        self.name = name
        self.needs: dict[str, dict[str, list[str]]] = {}

    def newest(self, prefix: str) -> tuple[str, str] | None:
        """(version, library) of the newest ``prefix_x.y`` requirement, or None."""
        best = None
        for lib, versions in self.needs.items():
            for vname in versions:
                m = VERSION_RE.match(vname)
                if m and m.group(1) == prefix:
                    if best is None or version_key(m.group(2)) > version_key(best[0]):
                        best = (m.group(2), lib)
        return best

    def symbols_above(self, prefix: str, floor: str) -> dict[str, list[str]]:
        out = {}
        for versions in self.needs.values():
            for vname, syms in versions.items():
                m = VERSION_RE.match(vname)
                if m and m.group(1) == prefix and version_key(m.group(2)) > version_key(floor):
                    out[vname] = sorted(set(syms))
        return out

    def private(self) -> list[str]:
        return sorted({v for versions in self.needs.values() for v in versions if v == "GLIBC_PRIVATE"})


def parse_elf(data: bytes, name: str) -> ElfNeeds:
    """Read the version-needs table of an ELF image (32/64-bit, either byte order)."""
    if data[:4] != ELF_MAGIC or len(data) < 64:
        raise ValueError(f"{name}: not an ELF file")
    elf_class, endian = data[4], data[5]
    if elf_class not in (1, 2) or endian not in (1, 2):
        raise ValueError(f"{name}: unknown ELF class/byte order")
    e = "<" if endian == 1 else ">"
    is64 = elf_class == 2
    if is64:
        shoff, = struct.unpack_from(e + "Q", data, 0x28)
        shentsize, shnum = struct.unpack_from(e + "HH", data, 0x3A)
        sh_fmt, sym_fmt = e + "IIQQQQIIQQ", e + "IBBHQQ"
    else:
        shoff, = struct.unpack_from(e + "I", data, 0x20)
        shentsize, shnum = struct.unpack_from(e + "HH", data, 0x2E)
        sh_fmt, sym_fmt = e + "IIIIIIIIII", e + "IIIBBH"
    sections = []
    for i in range(shnum):
        off = shoff + i * shentsize
        if off + struct.calcsize(sh_fmt) > len(data):
            raise ValueError(f"{name}: truncated section header table")
        f = struct.unpack_from(sh_fmt, data, off)
        # name, type, flags, addr, offset, size, link, info, addralign, entsize
        sections.append({"type": f[1], "offset": f[4], "size": f[5], "link": f[6], "info": f[7],
                         "entsize": f[9]})

    def cstr(offset: int) -> str:
        end = data.index(b"\0", offset)
        return data[offset:end].decode("utf-8", "replace")

    out = ElfNeeds(name)
    verneed = [s for s in sections if s["type"] == SHT_GNU_VERNEED]
    if not verneed:
        return out  # static, or no versioned requirements
    index_to_need: dict[int, tuple[str, str]] = {}
    for sec in verneed:
        strtab = sections[sec["link"]]["offset"]
        pos = sec["offset"]
        for _ in range(sec["info"]):
            _vn_version, vn_cnt, vn_file, vn_aux, vn_next = struct.unpack_from(e + "HHIII", data, pos)
            lib = cstr(strtab + vn_file)
            apos = pos + vn_aux
            for _ in range(vn_cnt):
                _hash, _flags, vna_other, vna_name, vna_next = struct.unpack_from(e + "IHHII", data, apos)
                vname = cstr(strtab + vna_name)
                out.needs.setdefault(lib, {}).setdefault(vname, [])
                index_to_need[vna_other] = (lib, vname)
                if not vna_next:
                    break
                apos += vna_next
            if not vn_next:
                break
            pos += vn_next
    # Which undefined dynamic symbols carry each required version (.gnu.version indexes .dynsym).
    versym = next((s for s in sections if s["type"] == SHT_GNU_VERSYM), None)
    dynsym = next((s for s in sections if s["type"] == SHT_DYNSYM), None)
    if versym and dynsym and dynsym["entsize"]:
        strtab = sections[dynsym["link"]]["offset"]
        for i in range(dynsym["size"] // dynsym["entsize"]):
            f = struct.unpack_from(sym_fmt, data, dynsym["offset"] + i * dynsym["entsize"])
            st_name, st_shndx = f[0], (f[3] if is64 else f[5])
            if st_shndx != 0 or not st_name:
                continue
            idx, = struct.unpack_from(e + "H", data, versym["offset"] + 2 * i)
            need = index_to_need.get(idx & 0x7FFF)
            if need:
                out.needs[need[0]][need[1]].append(cstr(strtab + st_name))
    return out


def pyinstaller_entries(path: Path) -> list[tuple[str, bytes]] | None:
    """The (name, data) of every file in a PyInstaller one-file binary's CArchive, or None if it has none."""
    data = path.read_bytes()
    at = data.rfind(COOKIE_MAGIC)
    if at < 0 or at + struct.calcsize(COOKIE_FORMAT) > len(data):
        return None
    _magic, pkg_len, toc_off, toc_len, _pyver, pylib = struct.unpack_from(COOKIE_FORMAT, data, at)
    if not pylib.rstrip(b"\0"):
        return None
    start = at + struct.calcsize(COOKIE_FORMAT) - pkg_len
    toc = data[start + toc_off:start + toc_off + toc_len]
    entries, pos, head = [], 0, struct.calcsize(TOC_ENTRY_FORMAT)
    while pos < len(toc):
        length, off, dlen, _ulen, compressed, typecode = struct.unpack_from(TOC_ENTRY_FORMAT, toc, pos)
        name = toc[pos + head:pos + length].rstrip(b"\0").decode("utf-8")
        pos += length
        if typecode == b"o":  # a bootloader option, no data
            continue
        blob = data[start + off:start + off + dlen]
        entries.append((name, zlib.decompress(blob) if compressed else blob))
    return entries


def collect(paths: list[str]) -> tuple[list[ElfNeeds], list[str]]:
    """Every ELF file under the given paths (one-file binaries unpacked), and the names of all files seen."""
    found, names = [], []
    for p in map(Path, paths):
        files = sorted(q for q in p.rglob("*") if q.is_file() and not q.is_symlink()) if p.is_dir() else [p]
        for f in files:
            head = f.open("rb").read(4)
            if head != ELF_MAGIC:
                if p.is_dir():
                    continue
                raise ValueError(f"{f}: not an ELF file")
            found.append(parse_elf(f.read_bytes(), str(f)))
            names.append(f.name)
            entries = pyinstaller_entries(f)
            for name, blob in entries or []:
                names.append(os.path.basename(name))
                if blob[:4] == ELF_MAGIC:
                    found.append(parse_elf(blob, f"{f}!{name}"))
    return found, names


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `| head` ends it quietly
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", metavar="PATH",
                    help="ELF file, folder, or PyInstaller one-file binary")
    ap.add_argument("--floor", default="2.31", help="newest glibc allowed (default 2.31)")
    ap.add_argument("--glibcxx-floor", default="3.4.28",
                    help="newest GLIBCXX allowed when libstdc++ is not bundled (default 3.4.28)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    for label, value in (("--floor", args.floor), ("--glibcxx-floor", args.glibcxx_floor)):
        if not re.fullmatch(r"\d+(\.\d+)*", value):
            print(f"check-glibc-floor: {label} {value!r}: expected a version like 2.31", file=sys.stderr)
            return 2
    try:
        elves, names = collect(args.paths)
    except (OSError, ValueError, struct.error, zlib.error) as exc:
        print(f"check-glibc-floor: {exc}", file=sys.stderr)
        return 2
    bundles_libstdcxx = any(n.startswith("libstdc++.so") for n in names)

    rows, offenders = [], []
    for elf in elves:
        glibc, glibcxx = elf.newest("GLIBC"), elf.newest("GLIBCXX")
        too_new = elf.symbols_above("GLIBC", args.floor)
        if not bundles_libstdcxx:
            too_new.update(elf.symbols_above("GLIBCXX", args.glibcxx_floor))
        for v in elf.private():
            too_new[v] = sorted(s for lib in elf.needs.values() for s in lib.get(v, []))
        rows.append({"file": elf.name, "glibc": glibc[0] if glibc else None,
                     "glibc_from": glibc[1] if glibc else None,
                     "glibcxx": glibcxx[0] if glibcxx else None, "too_new": too_new})
        if too_new:
            offenders.append(rows[-1])
    newest = max((r for r in rows if r["glibc"]), key=lambda r: version_key(r["glibc"]), default=None)
    report = {"floor": args.floor, "glibcxx_floor": args.glibcxx_floor, "elf_files": len(rows),
              "newest_glibc": newest["glibc"] if newest else None,
              "newest_glibc_file": newest["file"] if newest else None,
              "bundles_libstdcxx": bundles_libstdcxx, "ok": not offenders, "files": rows}
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        for r in sorted(rows, key=lambda r: version_key(r["glibc"] or "0"), reverse=True):
            extra = f" GLIBCXX_{r['glibcxx']}" if r["glibcxx"] else ""
            glibc = f"GLIBC_{r['glibc']} ({r['glibc_from']})" if r["glibc"] else "no GLIBC versions"
            print(f"{'TOO NEW' if r['too_new'] else 'ok     '} {glibc}{extra}  {r['file']}")
        for r in offenders:
            for vname, syms in sorted(r["too_new"].items()):
                shown = ", ".join(syms[:8]) + (f", ... ({len(syms)} in all)" if len(syms) > 8 else "")
                print(f"check-glibc-floor: {r['file']} needs {vname}: {shown}", file=sys.stderr)
        where = f" ({newest['file']})" if newest else ""
        verdict = "ok" if not offenders else f"{len(offenders)} file(s) above the floor"
        print(f"check-glibc-floor: {len(rows)} ELF file(s); newest GLIBC needed "
              f"{report['newest_glibc'] or '-'}{where}; floor {args.floor}: {verdict}")
    return 0 if not offenders else 1


if __name__ == "__main__":
    sys.exit(main())
