"""``palettelink`` tools: one entry point, one module per subcommand.

Each subcommand module defines ``add_arguments(parser)`` and ``run(args) -> int`` and is imported only
when its command runs, so ``palettelink info`` never pays for torch.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# torch's OpenMP threads busy-wait by default; on a shared 2-core edge box or CI runner that made
# training steps 5-10x slower. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from palettelink.errors import PaletteLinkError

COMMANDS: dict[str, tuple[str, str]] = {
    "build-bundle": ("palettelink.train.build_bundle", "split a detector and write a bundle folder"),
    "train": ("palettelink.train.pipeline", "train the palette codec of a bundle on unlabelled images"),
    "bench": ("palettelink.bench.run", "rate-accuracy benchmark against JPEG/WebP/AVIF and baselines"),
    "info": ("palettelink.info", "show the bundles under a root and their codecs and levels"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="palettelink", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    argv = sys.argv[1:] if argv is None else argv
    wanted = argv[0] if argv and argv[0] in COMMANDS else None
    modules = {}
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        if name == wanted:
            modules[name] = importlib.import_module(module)
            modules[name].add_arguments(p)
    args = parser.parse_args(argv)
    try:
        return int(modules[args.command].run(args) or 0)
    except PaletteLinkError as e:
        print(f"palettelink {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
