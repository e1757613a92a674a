"""The floor plan of docs/architecture.md, checked on the source: every import of every module of
``palettelink``, ``server`` and ``edge`` (top level, inside functions, under ``TYPE_CHECKING``, and
``importlib.import_module("literal")``) points to its own floor or one below, edge and server never
import each other, and no two modules import each other, directly or round a longer circle.

Everything is read with :mod:`ast`; nothing is imported, so the check needs no torch or server extra.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("palettelink", "server", "edge")
DOC = ROOT / "docs" / "architecture.md"

# Bottom first. A pattern ending in ".*" is that package and everything under it; any other pattern
# is one module exactly (so "palettelink" is the package's own __init__, not the whole core).
FLOORS: list[tuple[str, tuple[str, ...]]] = [
    ("wire", ("palettelink", "palettelink.errors", "palettelink.v1.*")),
    ("coding", ("palettelink.entropy", "palettelink.bitstream", "palettelink.rle", "palettelink.image",
                "palettelink.samples", "palettelink.capture", "palettelink.benchfile", "palettelink.scoring",
                "palettelink.cliutil", "palettelink.cpu")),
    ("bundle", ("palettelink.bundle", "palettelink.fetch", "palettelink.front")),
    ("codecs", ("palettelink.codecs.*", "palettelink.ratecontrol", "palettelink.levels")),
    ("models", ("palettelink.models.*",)),
    ("train", ("palettelink.train.*",)),
    ("apps", ("edge.*", "server.*")),
    ("tools", ("palettelink.bench.*", "palettelink.tools.*", "palettelink.cli")),
]

# Rooms on one floor that must not import each other.
APART = [("edge.*", "server.*")]

# Known arrows against the plan, each with why it is still there and what ends it. An entry that no
# longer occurs fails the test too: delete it when its arrow goes.
KNOWN_UPWARD: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Arrow:
    src: str
    dst: str
    path: str
    line: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.src} imports {self.dst}"


def _modules() -> dict[str, Path]:
    """Dotted name → file, for every module of the project's packages."""
    out = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


MODULES = _modules()


def _known(name: str) -> str | None:
    """The project module ``name`` names, or the module it is an attribute of; None if not ours."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _targets(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The dotted names an import node (or an ``import_module("x")`` call) brings in."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        return [source] + [f"{source}.{a.name}" for a in node.names]  # `from pkg import submodule`
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute | ast.Name)
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id) == "import_module"
            and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        return [node.args[0].value]
    return []


def _arrows() -> list[Arrow]:
    arrows = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            seen = set()
            for name in _targets(node, module, is_package):
                dst = _known(name)
                if dst is not None and dst != module and dst not in seen:
                    seen.add(dst)
                    arrows.append(Arrow(module, dst, str(path.relative_to(ROOT)), getattr(node, "lineno", 0)))
    return arrows


ARROWS = _arrows()


def _matches(module: str, pattern: str) -> bool:
    if pattern.endswith(".*"):
        base = pattern[:-2]
        return module == base or module.startswith(base + ".")
    return module == pattern


def floor_of(module: str) -> int:
    hits = [i for i, (_, patterns) in enumerate(FLOORS) if any(_matches(module, p) for p in patterns)]
    assert len(hits) == 1, f"{module} is on {len(hits)} floors of the plan, not one"
    return hits[0]


def test_every_module_has_one_floor() -> None:
    placed = {m: [FLOORS[i][0] for i, (_, ps) in enumerate(FLOORS) if any(_matches(m, p) for p in ps)]
              for m in MODULES}
    wrong = {m: f for m, f in placed.items() if len(f) != 1}
    assert not wrong, ("place each module on exactly one floor (FLOORS here and the table in "
                       f"docs/architecture.md): {wrong}")


def test_no_import_points_up() -> None:
    up = [a for a in ARROWS if floor_of(a.dst) > floor_of(a.src) and (a.src, a.dst) not in KNOWN_UPWARD]
    assert not up, "imports from a lower floor to a higher one (see docs/architecture.md):\n" + "\n".join(
        f"  {a}  ({FLOORS[floor_of(a.src)][0]} -> {FLOORS[floor_of(a.dst)][0]})" for a in up)


def test_known_upward_arrows_still_exist_and_still_point_up() -> None:
    """A listed exception whose arrow is gone (or no longer points up) must be deleted from the list."""
    present = {(a.src, a.dst) for a in ARROWS}
    stale = [k for k in KNOWN_UPWARD if k not in present or floor_of(k[1]) <= floor_of(k[0])]
    assert not stale, f"delete these from KNOWN_UPWARD (and docs/architecture.md): {stale}"


@pytest.mark.parametrize("pair", APART, ids=lambda p: " / ".join(p))
def test_rooms_kept_apart_never_import_each_other(pair: tuple[str, str]) -> None:
    a, b = pair
    crossing = [x for x in ARROWS if (_matches(x.src, a) and _matches(x.dst, b))
                or (_matches(x.src, b) and _matches(x.dst, a))]
    assert not crossing, "\n".join(map(str, crossing))


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_no_import_cycles() -> None:
    edges: dict[str, set[str]] = defaultdict(set)
    for m in MODULES:
        edges[m]
    for a in ARROWS:
        edges[a.src].add(a.dst)
    circles = _cycles(edges)
    where = {(a.src, a.dst): a for a in ARROWS}
    assert not circles, "import cycles:\n" + "\n".join(
        "  " + " <-> ".join(c) + "\n" + "\n".join(
            f"    {where[s, d]}" for s in c for d in c if (s, d) in where)
        for c in circles)


def test_the_checker_sees_imports_inside_functions_and_cycles() -> None:
    """The walk is only as good as what it sees: a deferred import and a two-module circle."""
    tree = ast.parse("def f():\n    from palettelink import codecs\n    import importlib\n"
                     "    importlib.import_module('palettelink.bundle')\n")
    names = [n for node in ast.walk(tree) for n in _targets(node, "palettelink.bitstream", False)]
    assert {_known(n) for n in names} >= {"palettelink.codecs", "palettelink.bundle"}
    assert _targets(ast.parse("from . import entropy").body[0], "palettelink.bitstream", False) == [
        "palettelink", "palettelink.entropy"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_architecture_page_lists_the_same_floors() -> None:
    """docs/architecture.md's floor table names every floor and pattern of FLOORS, bottom first, and
    every known exception; the README links it."""
    doc = DOC.read_text()
    rows = re.findall(r"^\|\s*(\d+)\s*\|\s*(\w+)\s*\|([^|]*)\|", doc, flags=re.M)
    assert [(int(n), name) for n, name, _ in rows] == [(i, name) for i, (name, _) in enumerate(FLOORS)]
    for (_, patterns), (_, _, cell) in zip(FLOORS, rows, strict=True):
        listed = set(re.findall(r"`([\w.*]+)`", cell))
        assert listed == set(patterns), f"{cell.strip()} vs {patterns}"
    for src, dst in KNOWN_UPWARD:
        assert f"`{src}` → `{dst}`" in doc, f"docs/architecture.md does not list {src} -> {dst}"
    assert "docs/architecture.md" in (ROOT / "README.md").read_text()
