"""The command line: every subcommand listed; bad input is one clear line, exit code 2, nothing written."""

import pytest

from bench.cli import COMMANDS
from test_external_stabilizer import RUN, stabench


def test_help_lists_every_subcommand_with_one_line():
    r = stabench(["--help"])
    assert r.returncode == 0
    for name, (_, help_) in COMMANDS.items():
        assert name in r.stdout
        assert help_.split()[0] in r.stdout


@pytest.mark.parametrize("extra,needle", [
    (["--stabilizer", "nope"], "unknown stabilizer 'nope'"),
    (["--stabilizer", "zloss", "--lam", "-1"], "lam must be a finite number >= 0"),
    (["--stabilizer", "softcap", "--cap", "0"], "cap must be a finite number > 0"),
    (["--stabilizer", "baseline", "--lam", "1e-4"], "has no hyperparameter lam"),
    (["--data", "text:/no/such/file.txt"], "data path not found"),
    (["--model", "huge"], "unknown preset 'huge'; allowed: nano, micro"),
    (["--lr", "-3"], "lr: must be > 0"),
])
def test_bad_input_is_one_error_line_and_writes_nothing(tmp_path, extra, needle):
    out = tmp_path / "out"
    r = stabench([*RUN, *extra, "--out", str(out)])
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert not out.exists()


def test_config_file_values_with_flags_overriding(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('model = "nano"\nstabilizer = "softcap"\nsteps = 12\nwarmup = 2\n[hparams]\ncap = 7.0\n')
    r = stabench([*RUN, "--config", str(cfg), "--steps", "10", "--out", str(tmp_path / "o")])
    assert r.returncode == 0, r.stderr
    import pandas as pd
    row = pd.read_parquet(tmp_path / "o" / "runs.parquet").iloc[0]
    assert (row["stabilizer"], row["cap"], row["steps"]) == ("softcap", 7.0, 10)


def test_unknown_key_in_config_file_names_file_key_and_allowed(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("learning_rate = 0.1\n")
    r = stabench([*RUN, "--config", str(cfg), "--out", str(tmp_path / "o")])
    assert r.returncode == 2
    assert str(cfg) in r.stderr and "learning_rate" in r.stderr and "allowed: model" in r.stderr


def test_presets_lists_every_preset_with_its_parameter_count():
    r = stabench(["presets"])
    assert r.returncode == 0
    for name in ("nano", "micro", "tiny", "small", "16M", "29M", "57M", "109M", "221M"):
        assert name in r.stdout
