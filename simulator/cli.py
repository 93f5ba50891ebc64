"""The ``moesim`` command: one entry point, one subcommand module each.

Each module listed in :data:`COMMANDS` provides ``register(subparsers)``, which adds its
subparser and sets ``func`` to a callable taking the parsed arguments and returning an exit code.
User-facing errors (:class:`traces.errors.MoesimError`) print as one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from traces.errors import MoesimError

#: Subcommand modules, in the order ``moesim --help`` lists them.
COMMANDS = [
    "simulator.cmd_demo",
    "simulator.cmd_replay",
    "simulator.cmd_sweep",
    "simulator.cmd_curve",
    "simulator.cmd_plot",
    "simulator.cmd_export",
    "simulator.cmd_train",
    "simulator.cmd_predict",
    "traces.cmd_import",
    "traces.cmd_synth",
    "traces.cmd_stats",
    "traces.cmd_capture",
    "simulator.cmd_calibrate",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moesim",
        description="Trace-driven simulator for Mixture-of-Experts expert offloading: replay "
        "expert-activation traces through GPU expert caches, PCIe transfers and prefetchers.",
    )
    parser.add_argument("--version", action="version", version=f"moesim {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue  # a subcommand not built yet
            raise
        module.register(sub)
    return parser


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("moesim")
    except Exception:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except MoesimError as exc:
        print(f"moesim {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moesim {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
