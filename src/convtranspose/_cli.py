"""The `convtranspose` command: thin dispatch to one module per subcommand.

Each subcommand module exposes `add_parser(subparsers)` that registers its arguments and
sets `func` (a callable taking the parsed namespace and returning an exit code).
Modules are imported lazily so that `convtranspose demo` never pays for dask or torch.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import sys

SUBCOMMANDS = {
    "demo": "convtranspose._demo",
    "bench": "convtranspose._bench",
    "apply": "convtranspose._apply",
}


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr and exit code 2 (scripts grep for them)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="convtranspose",
        description="MLX-exact transposed convolutions on NumPy arrays, fast on the CPU.")
    parser.add_argument("--version", action="store_true",
                        help="print the version and the kernel in use, and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    wanted = [a for a in argv if a in SUBCOMMANDS][:1] or list(SUBCOMMANDS)
    for name in SUBCOMMANDS:
        if name in wanted:
            try:
                importlib.import_module(SUBCOMMANDS[name]).add_parser(sub)
                continue
            except ImportError:
                pass
        sub.add_parser(name, help=f"(run 'convtranspose {name} -h')")
    return parser


def version_text() -> str:
    """'convtranspose 0.1.0 (compiled kernel: avx2)': the version of the package that runs,
    from its installed metadata, else (run from a source tree) from the package itself."""
    import convtranspose

    version = convtranspose.__version__
    try:
        dist = importlib.metadata.distribution("convtranspose")
        # Only if that installed copy is the one imported, not another in a source tree.
        if os.path.samefile(dist.locate_file("convtranspose/__init__.py"),
                            convtranspose.__file__):
            version = dist.version
    except (importlib.metadata.PackageNotFoundError, OSError):
        pass
    isa = convtranspose.native_isa()
    kernel = f"compiled kernel: {isa}" if isa else "no compiled kernel: NumPy/BLAS fallback"
    return f"convtranspose {version} ({kernel})"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.version:
        print(version_text())
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
