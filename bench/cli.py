"""The ``stabench`` command line. Each subcommand lives in the module of its concept."""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import StabenchError, UsageError  # noqa: F401  (UsageError: the old import location)

# name -> (module with configure(parser) and main(args) -> int, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("bench.run_cli", "train one model with one stabilizer and record it to Parquet"),
    "presets": ("bench.run_cli", "list model presets with their parameter counts"),
    "sweep": ("bench.sweep.cli", "run a sweep file locally with N worker processes"),
    "worker": ("bench.sweep.cli", "join a running sweep as one worker (any machine)"),
    "status": ("bench.sweep.cli", "show a sweep's trials by state and its failures"),
    "launch": ("bench.sweep.cli", "write (and submit) a Slurm array job of sweep workers"),
    "figures": ("bench.analysis.cli", "write all figures and tables of a results directory"),
    "report": ("bench.analysis.cli", "write a self-contained HTML report of a results directory"),
    "leaderboard": ("bench.analysis.cli", "rank stabilizers across sweeps by LR sensitivity and loss"),
    "claims": ("bench.analysis.cli", "test the reference study's claims on a results directory (tables, verdicts)"),
    "perf": ("bench.perf", "benchmark step time, MFU, stabilizer overhead and sweep throughput"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stabench", description="LLM-pretraining stabilizer benchmark.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module, _name=name)
        try:
            configure = getattr(importlib.import_module(module), "configure")
        except ModuleNotFoundError:  # pragma: no cover - a subcommand not installed
            continue
        configure(name, p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(importlib.import_module(args._module).main(args._name, args) or 0)
    except StabenchError as e:
        print(f"stabench {args._name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    from bench.cli import main as _main  # the importable module, not a second copy as __main__
    sys.exit(_main())
