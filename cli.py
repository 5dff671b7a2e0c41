"""The ``sparsedge`` command: a dispatcher that imports each subcommand lazily.

Each subcommand lives in the subpackage that owns it, as a module exposing
``add_arguments(parser)`` and ``run(args) -> int``. Only the chosen one is imported,
so ``sparsedge run`` never imports torch and starts fast.

Exit codes: 0 ok; 1 a user error (``SparsedgeError``, printed as one line);
2 a usage error (argparse). Anything else is a bug and shows its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import SparsedgeError

# name -> (module, one-line help). Modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("sparsedge.loaders.cli", "convert a PyTorch checkpoint or HF folder to a .sparsedge file"),
    "inspect": ("sparsedge.formats.cli", "print the tensor table and graph summary of a model file"),
    "run": ("sparsedge.runtime.cli_run", "run a model file on .npy inputs"),
    "tune": ("sparsedge.runtime.cli_tune", "time candidate kernels per layer and cache the fastest"),
    "warmup": ("sparsedge.runtime.cli_warmup", "precompile every kernel a model needs on this board"),
    "bench": ("sparsedge.bench.cli", "benchmark kernels and models; compare and plot results"),
    "demo": ("sparsedge.bench.demo", "convert, run, compare and benchmark the shipped demo model"),
    "build-capi": ("sparsedge.runtime.capi.build", "build the C API shared library and header"),
}


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sparsedge",
        description="Sparse-kernel inference runtime for CPUs and ARM edge boards.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {k:<11} {v[1]}" for k, v in COMMANDS.items()),
    )
    p.add_argument("--version", action="store_true", help="print the version and exit")
    p.add_argument("command", nargs="?", help="one of: " + ", ".join(COMMANDS))
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0 if argv else 2
    if argv[0] == "--version":
        from . import __version__

        print(f"sparsedge {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        top.print_usage(sys.stderr)
        print(f"sparsedge: error: unknown command {name!r} (choose from {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    modname, help_ = COMMANDS[name]
    mod = importlib.import_module(modname)
    parser = argparse.ArgumentParser(prog=f"sparsedge {name}", description=getattr(mod, "DESCRIPTION", help_),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mod.add_arguments(parser)
    try:
        args = parser.parse_args(rest)
    except SystemExit as e:  # argparse: 2 on usage errors, 0 on --help
        return int(e.code or 0)
    try:
        return int(mod.run(args) or 0)
    except SparsedgeError as e:
        print(f"sparsedge {name}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"sparsedge {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
