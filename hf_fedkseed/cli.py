"""The `hf-fedkseed` command line: version and environment report (training subcommands arrive with recipes)."""

from __future__ import annotations

import argparse
import platform
import sys


def _env() -> int:
    """Print the versions a bug report needs; heavy imports happen only here."""
    from importlib.metadata import PackageNotFoundError, version

    from . import DEFAULT_ENGINE, __version__

    print(f"hf-fedkseed {__version__} (default perturbation engine: {DEFAULT_ENGINE})")
    print(f"python {platform.python_version()} on {platform.platform()}")
    for package in ("torch", "transformers", "accelerate", "datasets", "evaluate", "peft", "flwr", "bitsandbytes"):
        try:
            print(f"{package} {version(package)}")
        except PackageNotFoundError:
            print(f"{package} not installed")
    import torch

    print(f"cuda available: {torch.cuda.is_available()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-fedkseed",
        description="Federated full-parameter tuning of language models with zeroth-order steps over K seeds.",
    )
    parser.add_argument("--version", action="store_true", help="print the package version and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("env", help="print the versions of hf-fedkseed and its dependencies")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(__version__)
        return 0
    if args.command == "env":
        return _env()
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
