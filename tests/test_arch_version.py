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
