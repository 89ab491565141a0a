"""A stabilizer written outside stabench is used without changing stabench:
by ``module:Class``, by ``path/file.py:Class``, and by an entry point in group ``stabench.stabilizers``."""
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = Path(__file__).parent / "plugins"
RUN = ["run", "--model", "nano", "--vocab-size", "256", "--seq-len", "32", "--batch-size", "4",
       "--steps", "20", "--warmup", "5", "--eval-every", "10", "--eval-batches", "2",
       "--data", "synthetic:tokens=50000", "--threads", "1", "--quiet"]


def stabench(args, env_extra=None, cwd=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "bench.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd or ROOT, timeout=300)


def test_module_colon_class_from_outside_the_package(tmp_path):
    out = tmp_path / "out"
    r = stabench([*RUN, "--stabilizer", "my_stabilizers:LogitL2", "--lam", "0.01", "--out", str(out)],
                 env_extra={"PYTHONPATH": str(PLUGINS)})
    assert r.returncode == 0, r.stderr
    runs = pd.read_parquet(out / "runs.parquet")
    assert runs.loc[0, "stabilizer"] == "my_stabilizers:LogitL2"
    assert runs.loc[0, "lam"] == 0.01
    curves = pd.read_parquet(out / "curves.parquet")
    assert (curves["reg_loss"] > 0).all()  # its loss term was really added


def test_file_path_colon_class(tmp_path):
    spec = f"{PLUGINS / 'my_stabilizers.py'}:LogitL2"
    r = stabench([*RUN, "--stabilizer", spec, "--hp", "lam=0.5", "--out", str(tmp_path)])
    assert r.returncode == 0, r.stderr
    assert pd.read_parquet(tmp_path / "runs.parquet").loc[0, "lam"] == 0.5


def test_entry_point_group_stabench_stabilizers(tmp_path):
    # an installed distribution is a dist-info folder on sys.path: make one by hand
    site = tmp_path / "site"
    info = site / "my_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[stabench.stabilizers]\nlogit_l2 = my_stabilizers:LogitL2\n")
    env = {"PYTHONPATH": os.pathsep.join([str(site), str(PLUGINS)])}
    r = stabench([*RUN, "--stabilizer", "logit_l2", "--out", str(tmp_path / "out")], env_extra=env)
    assert r.returncode == 0, r.stderr
    assert pd.read_parquet(tmp_path / "out" / "runs.parquet").loc[0, "stabilizer"] == "logit_l2"


def test_a_class_that_is_not_a_stabilizer_is_refused(tmp_path):
    r = stabench([*RUN, "--stabilizer", "os:getcwd", "--out", str(tmp_path / "x")])
    assert r.returncode == 2
    assert "not a subclass" in r.stderr
    assert not (tmp_path / "x").exists()
