"""One error hierarchy (bench.errors): every class a StabenchError, the old import paths kept,
no module below the CLI importing bench.cli, and the CLI printing any of them as one line, exit 2."""
import ast
import inspect
from pathlib import Path

import pytest

import bench
import bench.errors as errors
from bench.cli import main

PACKAGE = Path(bench.__file__).parent
ERRORS = [errors.UsageError, errors.ConfigError, errors.DataError, errors.StabilizerError,
          errors.StorageError, errors.PackError]


def _imports_cli(source: str, package: tuple[str, ...]) -> list[int]:
    """Line numbers in ``source`` (a module of ``package``) that import bench.cli, absolute or relative."""
    hits = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = list(package[:len(package) - node.level + 1]) if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names = [module] + [f"{module}.{a.name}" for a in node.names]
        else:
            continue
        if any(n == "bench.cli" or n.startswith("bench.cli.") for n in names):
            hits.append(node.lineno)
    return hits


def test_no_module_below_the_cli_imports_bench_cli():
    allowed = {PACKAGE / "cli.py", PACKAGE / "__main__.py"}
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent)  # bench/sweep/cli.py: a module of package ("bench", "sweep")
        if path not in allowed and (lines := _imports_cli(path.read_text(), rel.parent.parts)):
            offenders[str(rel)] = lines
    assert offenders == {}


def test_the_import_checker_sees_relative_and_absolute_imports():
    sweep, bench_ = ("bench", "sweep"), ("bench",)
    for source, package in [("from ..cli import UsageError", sweep), ("from .. import cli", sweep),
                            ("from .cli import UsageError", bench_), ("import bench.cli", sweep),
                            ("from bench.cli import main", sweep), ("def f():\n    from ..cli import X", sweep)]:
        assert _imports_cli(source, package), source
    for source, package in [("from .cli import main", sweep), ("from bench.sweep.cli import main", bench_),
                            ("from ..errors import UsageError", sweep), ("import bench.clix", bench_)]:
        assert not _imports_cli(source, package), source


@pytest.mark.parametrize("cls", ERRORS)
def test_every_error_is_a_stabench_error(cls):
    assert issubclass(cls, errors.StabenchError)


def test_every_class_in_bench_errors_is_listed():
    found = {c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__}
    assert found == {errors.StabenchError, *ERRORS}


def test_builtin_bases_and_old_import_locations_are_kept():
    from bench.cli import UsageError
    from bench.config import ConfigError
    from bench.data import DataError
    from bench.data.tokens import DataError as TokensDataError
    from bench.pack.hooks import PackError
    from bench.stabilizers import StabilizerError

    assert UsageError is errors.UsageError and ConfigError is errors.ConfigError
    assert DataError is TokensDataError is errors.DataError
    assert StabilizerError is errors.StabilizerError and PackError is errors.PackError
    for cls in (ConfigError, DataError, StabilizerError):
        assert issubclass(cls, ValueError)
    assert issubclass(PackError, RuntimeError)


def test_config_error_message_format():
    e = errors.ConfigError("grid.lr[2]", "must be > 0", "sweeps/x.toml")
    assert str(e) == "sweeps/x.toml: grid.lr[2]: must be > 0" and e.key == "grid.lr[2]"
    assert str(errors.ConfigError("lr", "bad")) == "lr: bad" and errors.ConfigError("lr", "bad").source is None


@pytest.mark.parametrize("argv,needle", [
    (["run", "--model", "nosuch"], "stabench run: error: command line: model: unknown preset 'nosuch'"),  # ConfigError
    (["run", "--hp", "lam"], "stabench run: error: --hp 'lam': expected KEY=NUMBER"),  # UsageError
])
def test_cli_prints_an_error_as_one_line_and_exits_2(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(needle), err


def test_cli_maps_a_storage_error(capsys, tmp_path):
    assert main(["status", str(tmp_path), "--storage", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"stabench status: error: storage {tmp_path} is a directory")


@pytest.mark.parametrize("cls", [c for c in ERRORS if c is not errors.ConfigError])
def test_cli_maps_every_subclass(capsys, monkeypatch, cls):
    import bench.perf_cli

    def fail(name, args):
        raise cls("something is wrong")

    monkeypatch.setattr(bench.perf_cli, "main", fail)
    assert main(["perf"]) == 2
    assert capsys.readouterr().err == "stabench perf: error: something is wrong\n"
