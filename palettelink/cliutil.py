"""What the three console scripts share: ``--version``, a quiet exit when stdout is closed early
(``| head``), one line naming the pip extra when an optional dependency is missing, and usage
errors on one line (:class:`ArgumentParser`), and the comma-separated list types the commands share
(``--levels 0,2,4``, ``--kbps 50,100``, ``--tensor-weights 0.3,0.5,4``), so every command says the same
thing about a malformed one.

The edge install has neither torch nor FastAPI, yet it ships ``palettelink-server`` and ``palettelink
bench``; without this they died with a ModuleNotFoundError traceback that did not say what to do.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Callable, Iterable
from typing import NoReturn, TypeVar

from palettelink import __version__

EXIT_USAGE = 2
EXIT_MISSING_EXTRA = 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for any other tool behind a closed pipe

# Our own top-level packages: an ImportError inside them is a bug, never a missing extra.
OURS = frozenset({"palettelink", "edge", "server"})

# Import names (not distribution names) of what each extra in pyproject.toml installs.
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "edge": ("cv2",),
    "server": ("torch", "torchvision", "ultralytics", "fastapi", "uvicorn", "prometheus_client", "cv2"),
    "train": ("torch", "torchvision", "ultralytics", "onnx", "onnxslim", "sklearn", "scipy", "matplotlib",
              "tqdm"),
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse with usage errors on one line (``PROG: error: MESSAGE (see PROG --help)``), exit 2,
    like every other error of these tools; subcommand parsers inherit it."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_version(parser: argparse.ArgumentParser) -> None:
    """``--version`` printing ``PROG X.Y.Z`` (the package version) and exiting 0."""
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")


def missing_modules(modules: Iterable[str]) -> list[str]:
    """The ones that cannot be found, without importing any (torch alone takes seconds)."""
    missing = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def extra_hint(prog: str, extra: str, what: str) -> str:
    return f"{prog}: {what}; this needs the '{extra}' extra: pip install 'palettelink[{extra}]'"


def check_extra(prog: str, extra: str, modules: Iterable[str] | None = None) -> int | None:
    """Print the one-line hint and return the exit code if a module of ``extra`` is absent."""
    missing = missing_modules(EXTRA_MODULES[extra] if modules is None else modules)
    if not missing:
        return None
    print(extra_hint(prog, extra, f"{', '.join(missing)} not installed"), file=sys.stderr)
    return EXIT_MISSING_EXTRA


def report_import_error(prog: str, extra: str, err: ImportError) -> int:
    """The hint for an ImportError of a third-party module; re-raises one of our own (a bug)."""
    if (err.name or "").split(".")[0] in OURS:
        raise err
    print(extra_hint(prog, extra, f"cannot import {err.name or 'a dependency'} ({err})"), file=sys.stderr)
    return EXIT_MISSING_EXTRA


def quiet_on_broken_pipe(main: Callable[[], int]) -> int:
    """Run ``main``; if the reader of stdout went away, exit 141 without a traceback. Remaining
    output goes to /dev/null so the flush at interpreter exit does not raise again (as the Python
    docs on SIGPIPE recommend)."""
    try:
        code = main()
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def exit_without_teardown(code: int) -> NoReturn:
    """Flush stdout and stderr and leave with ``code`` at once (``os._exit``), skipping the
    interpreter's teardown of native libraries.

    For a command whose work is done and written: gRPC's C core can deadlock while a channel is
    destroyed with the GIL held (its event engine waits for a worker that waits for the GIL;
    grpc/grpc#42247, open), freezing the whole process with every thread idle. The edge hit it twice
    in about a thousand runs (a CI run and a demo), after every record was printed. A camera script
    or a CI job must not hang on a stream that has finished, and the OS closes sockets and files
    anyway. Atexit handlers do not run: nothing here registers one that matters."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can be said there
            pass
    os._exit(code)


N = TypeVar("N", int, float)


def _numbers(text: str, kind: Callable[[str], N], what: str) -> list[N]:
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from e


def ints(text: str) -> list[int]:
    return _numbers(text, int, "integers")


def floats(text: str) -> list[float]:
    return _numbers(text, float, "numbers")


def positive_ints(text: str) -> list[int]:
    out = ints(text)
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected integers ≥ 1, got {text!r}")
    return out


def positive_int(text: str) -> int:
    """One integer ≥ 1 (a count), or a usage error naming what was given."""
    out = positive_ints(text)
    if len(out) != 1:
        raise argparse.ArgumentTypeError(f"expected one integer ≥ 1, got {text!r}")
    return out[0]


def non_negative_float(text: str) -> float:
    """One number ≥ 0 (a weight), or a usage error naming what was given."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0:  # also catches nan
        raise argparse.ArgumentTypeError(f"expected a number ≥ 0, got {text!r}")
    return value


def probability(text: str) -> float:
    """One number in [0, 1], or a usage error naming what was given."""
    value = non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {text!r}")
    return value
