"""The architecture version is part of every run's key and record: a result of the model before
issue 14 (version 1) is never taken for one of today's, and analysis pools them only when told to."""
import json

import pandas as pd
import pytest

from bench import records
from bench.analysis.results import load_results, one_protocol
from bench.config import ConfigError, RunConfig, from_dict
from bench.presets import ARCH_VERSION

from helpers import tiny_config


def test_todays_runs_are_version_2_and_the_version_is_in_the_key():
    from bench.config import _key_dict

    assert ARCH_VERSION == 2 and RunConfig().arch_version == 2
    assert _key_dict(RunConfig())["arch_version"] == 2
    assert RunConfig().replace(arch_version=3).key() != RunConfig().key()  # another version, another run


def test_only_the_current_architecture_trains():
    with pytest.raises(ConfigError, match="arch_version"):
        from_dict({"arch_version": 1}).check(machine=False)


def test_the_trainer_records_the_version():
    from bench.trainer import train
    assert train(tiny_config(steps=10, warmup=2)).run["arch_version"] == ARCH_VERSION


def _runs(version: int | None, sweep: str) -> list[dict]:
    cfg = RunConfig().to_dict()
    if version is None:  # a config written before issue 14: no arch_version key at all
        cfg.pop("arch_version")
    rows = []
    for i, lr in enumerate((0.01, 0.1)):
        c = {**cfg, "lr": lr, "sweep": sweep}
        rows.append(dict(run_id=f"{sweep}{i}", sweep=sweep, model="micro", stabilizer="baseline", hparams="{}",
                         lr=lr, seed=1, weight_tying=False, precision="fp32", L0=9.0, final_loss=3.0 + i,
                         diverged=False, config=json.dumps(c, sort_keys=True), vocab_size=8192,
                         arch_version=version, schema_version=records.SCHEMA_VERSION))
    return rows


def test_analysis_refuses_to_pool_versions_unless_told_to(tmp_path):
    for r in _runs(None, "old") + _runs(2, "new"):
        records.write_run(tmp_path, r, [])
    with pytest.raises(ValueError, match="arch_version"):
        load_results(tmp_path)
    assert len(load_results(tmp_path, mixed=True).runs) == 4
    assert len(load_results(tmp_path, study="new").runs) == 2
    frame = pd.DataFrame(_runs(2, "a") + _runs(2, "b"))
    assert len(one_protocol(frame, "here")) == 4  # one version, one protocol


def test_a_stored_config_of_the_old_model_reads_as_version_1():
    from bench.config import from_stored, upgrade_stored

    old = RunConfig().to_dict()
    old.pop("arch_version")
    div = {k: v for k, v in old["divergence"].items() if k not in ("nonfinite", "loss_above_L0", "spike")}
    old["divergence"] = {**div, "stop_on_spike": False}  # how version 1 wrote the spike rule
    cfg = from_stored(old)
    assert cfg.arch_version == 1 and cfg.divergence.spike == "record"
    assert from_stored(RunConfig().to_dict()) == RunConfig()  # today's configs pass unchanged
    assert upgrade_stored({"divergence": {"stop_on_spike": True}})["divergence"] == {"spike": "stop"}


def test_re_running_a_sweep_over_results_of_the_old_model_names_the_version(tmp_path, capsys):
    """A results directory of version-1 runs: the sweep refuses to mix them (exit 2, one line naming
    arch_version) instead of failing on the old config's keys; --force-new-protocol retrains."""
    from bench.cli import main

    old = RunConfig().to_dict()
    old.pop("arch_version")
    div = {k: v for k, v in old["divergence"].items() if k not in ("nonfinite", "loss_above_L0", "spike")}
    old["divergence"] = {**div, "stop_on_spike": True}
    sweep = tmp_path / "s.toml"
    sweep.write_text('name = "s"\n[train]\nsteps = 20\nwarmup = 2\nvocab_size = 256\ndata = "synthetic:tokens=50000"\n'
                     '[grid]\nmodels = ["nano"]\nlr = [0.01]\n[stabilizers]\nbaseline = {}\n')
    out = tmp_path / "out"
    row = dict(run_id="old0", sweep="s", model="nano", stabilizer="baseline", hparams="{}", lr=0.01, seed=1,
               weight_tying=False, precision="fp32", L0=5.5, final_loss=3.0, diverged=False, vocab_size=256,
               config=json.dumps({**old, "sweep": "s", "steps": 20, "warmup": 2, "vocab_size": 256,
                                  "data": "synthetic:tokens=50000", "model": "nano", "lr": 0.01}),
               schema_version=2)
    records.write_run(out, row, [])
    assert main(["sweep", str(sweep), "--out", str(out), "--workers", "1"]) == 2
    assert "arch_version: 1 → 2" in capsys.readouterr().err
    assert main(["sweep", str(sweep), "--out", str(out), "--workers", "1", "--force-new-protocol"]) == 0
    runs = records.read_runs(out)
    assert sorted(runs["arch_version"]) == [1, 2]  # the old row kept, the point retrained on today's model
