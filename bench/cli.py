"""The ``stabench`` command line. Each subcommand lives in the module of its concept.

Starting is cheap: ``configure`` functions import nothing heavy (no torch, pandas, optuna or
matplotlib), so ``stabench --help``, ``--version`` and ``stabench COMMAND --help`` answer at
once; a subcommand's ``main`` imports what it uses.

One convention for flags (README, "Command line"): a sweep file is the first argument
(``FILE.toml``), results directories are arguments of the commands that read them, ``--out DIR``
is always the results directory a command writes runs to, and outputs are named by their
format: ``--figures DIR``, ``--html FILE``, ``--markdown FILE``, ``--json FILE``, ``--script FILE``.
The spellings of the previous release still work for one release (``DEPRECATED``), with a note on stderr.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Iterable

from . import __version__
from .errors import StabenchError, UsageError  # noqa: F401  (UsageError: the old import location)

# name -> (module with configure(name, parser) and main(name, args) -> int, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("bench.run_cli", "train one model with one stabilizer and record it to Parquet"),
    "presets": ("bench.run_cli", "list model presets with their parameter counts"),
    "sweep": ("bench.sweep.cli", "run a sweep file locally with N worker processes"),
    "worker": ("bench.sweep.cli", "join a running sweep as one worker (any machine)"),
    "status": ("bench.sweep.cli", "show a sweep's trials by state and its failures"),
    "launch": ("bench.sweep.cli", "write (and submit) a Slurm array job of sweep workers"),
    "proxy": ("bench.sweep.cli", "serve a database storage to many workers through Optuna's gRPC proxy"),
    "figures": ("bench.analysis.cli", "write all figures and tables of a results directory"),
    "report": ("bench.analysis.cli", "write a self-contained HTML report of a results directory"),
    "leaderboard": ("bench.analysis.cli", "rank stabilizers across sweeps by LR sensitivity and loss"),
    "claims": ("bench.analysis.cli", "test the reference study's claims on a results directory (tables, verdicts)"),
    "compare": ("bench.analysis.cli", "compare result folders of one protocol: LRS and best loss with CIs, "
                                      "paired tests, one figure"),
    "precision-tax": ("bench.analysis.cli", "the cross-entropy cost of rounding a common logit offset, on a saved "
                                            "run; with --compare, the study's untied gaps it predicts"),
    "regime": ("bench.analysis.cli", "regime search: do untied baselines reach the study's mean logit >= 100 or "
                                     "(log Z)^2 >= 1e4? Table, growth fits to 100k steps, one figure"),
    "perf": ("bench.perf_cli", "benchmark step time, MFU, stabilizer overhead and sweep throughput"),
    "device-check": ("bench.device_check", "the prepared GPU check: CUDA tests, perf at 16M-221M, packed vs "
                                           "unpacked; JSON and Markdown (--device cpu --quick: the dry run)"),
}

SWEEP_FILE_NOTE = "pass the sweep file as the first argument"
# command -> old flag -> (new flag, or None for "the positional argument", note). Removed in the next release.
DEPRECATED: dict[str, dict[str, tuple[str | None, str]]] = {
    "worker": {"--sweep": (None, SWEEP_FILE_NOTE)},
    "launch": {"--sweep": (None, SWEEP_FILE_NOTE),
               "--results": ("--out", "use --out DIR for the results directory")},
    "figures": {"--out": ("--figures", "use --figures DIR")},
    "report": {"--out": ("--html", "use --html FILE")},
    "claims": {"--out": ("--markdown", "use --markdown FILE")},
    "leaderboard": {"--out": ("--markdown", "use --markdown FILE")},
}
# launch's --out named the script while --sweep was required: a command line with --sweep is of the old
# release, and its --out is the script (--script now)
_OLD_LAUNCH_OUT = ("--script", "use --script FILE for the script (--out DIR is now the results directory)")


def translate_deprecated(argv: list[str]) -> list[str]:
    """``argv`` with the previous release's spellings rewritten to today's, one note on stderr for each."""
    if not argv or argv[0] not in DEPRECATED:
        return list(argv)
    command, rest = argv[0], list(argv[1:])
    table = dict(DEPRECATED[command])
    end = rest.index("--") if "--" in rest else len(rest)
    head, tail = rest[:end], rest[end:]
    if command == "launch" and any(a == "--sweep" or a.startswith("--sweep=") for a in head):
        table["--out"] = _OLD_LAUNCH_OUT
    out: list[str] = []
    positionals: list[str] = []
    i = 0
    while i < len(head):
        arg = head[i]
        flag, eq, value = arg.partition("=")
        if flag in table:
            new, note = table[flag]
            print(f"stabench: {flag} is deprecated; {note}", file=sys.stderr)
            if not eq:
                if i + 1 >= len(head):  # let argparse report the missing value
                    out.append(new or flag)
                    break
                value, i = head[i + 1], i + 1
            if new is None:
                positionals.append(value)
            else:
                out += [new, value]
        else:
            out.append(arg)
        i += 1
    return [command, *out, *positionals, *tail]  # argparse takes positionals after options too


class _Parser(argparse.ArgumentParser):
    """argparse, but bad input is one line (``stabench run: error: …``) and exit code 2, without the
    usage block: ``--help`` shows that."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(configured: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The parser of every subcommand; only those in ``configured`` (default: all) get their arguments."""
    configured = set(COMMANDS if configured is None else configured)
    parser = _Parser(prog="stabench", description="LLM-pretraining stabilizer benchmark.")
    parser.add_argument("--version", action="version", version=f"stabench {__version__}",
                        help="print the version (stabench X.Y.Z) and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module, _name=name)
        if name not in configured:
            continue
        try:
            configure = getattr(importlib.import_module(module), "configure")
        except ModuleNotFoundError:  # pragma: no cover - a subcommand not installed
            continue
        configure(name, p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = translate_deprecated(sys.argv[1:] if argv is None else list(argv))
    # only the subcommand named is configured: `stabench --help` imports no subcommand module at all
    args = build_parser(argv[:1] if argv and argv[0] in COMMANDS else ()).parse_args(argv)
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
