"""``palettelink`` tools: one entry point, one module per subcommand.

Each subcommand module defines ``add_arguments(parser)`` and ``run(args) -> int`` and is imported only
when its command runs, so ``palettelink info`` never pays for torch.
"""

from __future__ import annotations

import importlib
import os
import sys

# torch's OpenMP threads busy-wait by default; on a shared 2-core edge box or CI runner that made
# training steps 5-10x slower. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from palettelink.cliutil import (
    ArgumentParser,
    add_version,
    check_extra,
    quiet_on_broken_pipe,
    report_import_error,
)
from palettelink.errors import PaletteLinkError

COMMANDS: dict[str, tuple[str, str]] = {
    "build-bundle": ("palettelink.train.build_bundle", "split a detector and write a bundle folder"),
    "train": ("palettelink.train.pipeline", "train the palette codec of a bundle on unlabelled images"),
    "corpus": ("palettelink.train.corpus", "gather the offline training/eval corpus from package registries"),
    "bench": ("palettelink.bench.run", "rate-accuracy benchmark against JPEG/WebP/AVIF and baselines"),
    "bench-stream": ("palettelink.bench.stream", "a video through the real server and edge at kbps targets"),
    "bench-edge": ("palettelink.bench.edge_speed", "edge time per frame on this box (edge install)"),
    "int8": ("palettelink.bench.int8", "an int8 edge graph for a bundle: quantise, measure, record"),
    "info": ("palettelink.tools.info", "show the bundles under a root and their codecs and levels"),
    "fuzz": ("palettelink.tools.fuzz",
             "mutate real frames of every codec; decode in-process or via a server"),
    "loadtest": ("palettelink.tools.loadtest", "N concurrent streams against a server for a bounded time"),
    "bench-serve": ("palettelink.bench.serve", "serving throughput (decode + task) at batch 1 and batched"),
    "bench-tasks": ("palettelink.bench.tasks", "each task of an image bundle per level vs JPEG/WebP/AVIF"),
}

# The pip extra a command needs beyond the core (checked before importing it, so an edge install gets
# a one-line hint instead of a ModuleNotFoundError). Commands not listed need the core only.
EXTRAS: dict[str, str] = {"build-bundle": "train", "train": "train", "bench": "train",
                          "bench-stream": "train", "bench-edge": "edge", "int8": "train", "fuzz": "server",
                          "loadtest": "edge", "bench-serve": "train", "bench-tasks": "train"}


def main(argv: list[str] | None = None) -> int:
    return quiet_on_broken_pipe(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    parser = ArgumentParser(prog="palettelink", description=__doc__.splitlines()[0])
    add_version(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    argv = sys.argv[1:] if argv is None else argv
    wanted = argv[0] if argv and argv[0] in COMMANDS else None
    modules = {}
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        if name == wanted:
            prog = f"palettelink {name}"
            if name in EXTRAS and (code := check_extra(prog, EXTRAS[name])) is not None:
                return code
            try:
                modules[name] = importlib.import_module(module)
            except ImportError as e:
                return report_import_error(prog, EXTRAS.get(name, "server"), e)
            modules[name].add_arguments(p)
    args = parser.parse_args(argv)
    try:
        return int(modules[args.command].run(args) or 0)
    except PaletteLinkError as e:
        print(f"palettelink {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:  # a dependency that exists but does not import (a broken install)
        return report_import_error(f"palettelink {args.command}", EXTRAS.get(args.command, "server"), e)


if __name__ == "__main__":
    sys.exit(main())
