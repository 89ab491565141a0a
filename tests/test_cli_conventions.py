"""The command line's conventions: it starts without torch, says its version, documents every flag, and
keeps the previous release's spellings working (with a note) for one release."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

import bench
from bench.cli import COMMANDS, DEPRECATED, build_parser, main, translate_deprecated

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "pandas", "optuna", "matplotlib", "numpy", "seaborn", "pyarrow")
PROBE = """
import json, sys
from bench.cli import main
try:
    main({argv!r})
except SystemExit as e:
    code = e.code
print(json.dumps({{"code": code, "heavy": [m for m in {heavy!r} if m in sys.modules]}}), file=sys.stderr)
"""


def probe(argv: list[str]) -> tuple[dict, str]:
    """Run ``main(argv)`` in a fresh interpreter; (exit code and heavy modules imported, stdout)."""
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv, heavy=HEAVY)], capture_output=True,
                       text=True, cwd=ROOT, env=env, timeout=120)
    return json.loads(r.stderr.strip().splitlines()[-1]), r.stdout


@pytest.mark.parametrize("argv", [["--help"], ["--version"], *[[name, "--help"] for name in COMMANDS]],
                         ids=" ".join)
def test_help_and_version_import_no_heavy_module(argv):
    result, out = probe(argv)
    assert result == {"code": 0, "heavy": []}, result
    assert out.strip()


def test_version_prints_the_package_version():
    r = subprocess.run([sys.executable, "-m", "bench.cli", "--version"], capture_output=True, text=True, cwd=ROOT,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=60)
    assert r.returncode == 0 and r.stdout == f"stabench {bench.__version__}\n"


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_of_every_subcommand_has_help():
    parser = build_parser()
    subs = _subparsers(parser)
    assert set(subs) == set(COMMANDS)
    for name, p in subs.items():
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            what = f"stabench {name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help and action.help.strip() and action.help != argparse.SUPPRESS, what
            # allowed values: argparse shows {a,b,c} unless a metavar hides them, then the help lists them
            if action.choices is not None and action.metavar is not None:
                text = action.help % {"choices": ", ".join(map(str, action.choices)), "default": action.default}
                assert all(str(c) in text for c in action.choices), what
            # an option with a non-trivial default says it
            if action.option_strings and action.default not in (None, False, True, [], "", argparse.SUPPRESS):
                assert "default" in action.help, what
        p.format_help()  # every %(...)s in the help expands


def test_run_flags_cover_every_cli_field_and_the_builtin_list_is_current():
    from bench.config import fields_with
    from bench.run_cli import BUILTIN_STABILIZERS, FIELD_HELP
    from bench.stabilizers import BUILTIN
    from bench.sweep import cli as sweep_cli, storage

    assert set(FIELD_HELP) == {f.name for f in fields_with(flag="cli")}
    assert set(BUILTIN_STABILIZERS) == set(BUILTIN)
    assert sweep_cli.STORAGE_ENV == storage.STORAGE_ENV


def test_run_help_shows_defaults_units_and_choices():
    text = " ".join(_subparsers(build_parser(["run"]))["run"].format_help().split())
    for needle in ("--steps STEPS", "(default: 500)", "--seq-len TOKENS", "one of auto, fp32, bf16, bf16-emu, fp64",
                   "one of nano, micro, tiny", "(default: results/dev)"):
        assert needle in text, needle


# -- deprecated spellings -------------------------------------------------------------------------------

@pytest.mark.parametrize("old,new,note", [
    (["worker", "--sweep", "s.toml", "--out", "r"], ["worker", "--out", "r", "s.toml"],
     "stabench: --sweep is deprecated; pass the sweep file as the first argument"),
    (["worker", "--sweep=s.toml"], ["worker", "s.toml"], "--sweep is deprecated"),
    (["launch", "slurm", "--sweep", "s.toml", "--array", "2", "--results", "R", "--out", "job.sh"],
     ["launch", "slurm", "--array", "2", "--out", "R", "--script", "job.sh", "s.toml"],
     "stabench: --results is deprecated; use --out DIR"),
    (["launch", "slurm", "s.toml", "--array", "2", "--results", "R"],
     ["launch", "slurm", "s.toml", "--array", "2", "--out", "R"], "--results is deprecated"),
    (["figures", "R", "--out", "F"], ["figures", "R", "--figures", "F"], "stabench: --out is deprecated; use --figures DIR"),
    (["report", "R", "--out", "r.html"], ["report", "R", "--html", "r.html"], "use --html FILE"),
    (["claims", "R", "--out", "c.md"], ["claims", "R", "--markdown", "c.md"], "use --markdown FILE"),
    (["leaderboard", "A", "B", "--out", "b.md"], ["leaderboard", "A", "B", "--markdown", "b.md"], "use --markdown FILE"),
])
def test_old_spellings_are_rewritten_with_a_note(capsys, old, new, note):
    assert translate_deprecated(old) == new
    assert note in capsys.readouterr().err


def test_new_spellings_pass_unchanged(capsys):
    for argv in (["worker", "s.toml", "--out", "r"], ["launch", "slurm", "s.toml", "--array", "2", "--out", "R",
                                                       "--script", "x.sh"], ["figures", "R", "--figures", "F"],
                 ["run", "--out", "r"], ["sweep", "s.toml", "--out", "r"], ["status", "r", "--out", "r"]):
        assert translate_deprecated(argv) == argv
    assert capsys.readouterr().err == ""
    assert set(DEPRECATED) <= set(COMMANDS)


def test_deprecated_spellings_still_work_end_to_end(tmp_path, monkeypatch, capsys):
    """The previous release's `launch --sweep F --results R --out SCRIPT` writes the same script as today's."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.toml").write_text('name = "s"\n[train]\nsteps = 4\nwarmup = 1\n[grid]\nmodels = ["nano"]\n'
                                     'lr = [1e-3]\n[stabilizers]\nbaseline = {}\n')
    assert main(["launch", "slurm", "--sweep", "s.toml", "--array", "2", "--results", "R", "--out", "old.sh"]) == 0
    err = capsys.readouterr().err
    assert err.count("is deprecated") == 3, err
    assert main(["launch", "slurm", "s.toml", "--array", "2", "--out", "R", "--script", "new.sh"]) == 0
    assert capsys.readouterr().err == ""
    old, new = (tmp_path / "old.sh").read_text(), (tmp_path / "new.sh").read_text()
    assert old == new and f"worker {tmp_path / 's.toml'} --out {tmp_path / 'R'}" in new


def test_a_missing_sweep_file_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["worker"])
    assert e.value.code == 2 and "FILE.toml" in capsys.readouterr().err
