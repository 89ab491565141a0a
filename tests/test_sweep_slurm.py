"""``stabench launch slurm``: the generated sbatch array script, its submission, and that it runs.

There is no Slurm here: the script's text is checked, ``bash -n`` parses it, a stand-in ``sbatch``
on PATH records how it is called, and the script itself is run with bash as an array task would be.
"""
from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from bench.cli import main

SWEEP = """\
name = "cluster"
[train]
steps = 20
warmup = 2
batch_size = 4
seq_len = 32
vocab_size = 256
eval_every = 10
eval_batches = 1
device = "{device}"
precision = "fp32"
[grid]
models = ["nano"]
lr = [1e-3, 1e-2]
[stabilizers]
baseline = {{}}
"""
PASSWORD = "hunter2-secret"


@pytest.fixture
def sweep(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "cluster.toml"
    path.write_text(SWEEP.format(device="cpu"))
    return path


def launch(*args: str) -> int:
    return main(["launch", "slurm", *args])


def sbatch_lines(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")]


def test_script_is_an_array_of_workers_on_the_sweep(sweep, tmp_path, capsys):
    assert launch(str(sweep), "--array", "12", "--script", "job.sh", "--time", "02:00:00",
                  "--partition", "cpu", "--max-parallel", "4") == 0
    assert "wrote job.sh: 12 array task(s)" in capsys.readouterr().out
    script = (tmp_path / "job.sh").read_text()
    assert script.startswith("#!/bin/bash\n")
    opts = sbatch_lines(script)
    assert "--array=0-11%4" in opts
    assert {"--job-name=stabench-cluster", "--ntasks=1", "--cpus-per-task=1", "--time=02:00:00",
            "--partition=cpu", "--requeue"} <= set(opts)
    assert f"--output={tmp_path / 'results' / 'cluster' / 'trials' / 'slurm-%A_%a.out'}" in opts
    assert not any(o.startswith("--gres") for o in opts)  # a CPU sweep asks for no GPU
    journal = tmp_path / "results" / "cluster" / "journal.log"
    assert f'export STABENCH_STORAGE="${{STABENCH_STORAGE:-{journal}}}"' in script
    assert f"cd {tmp_path}\n" in script
    out = tmp_path / "results" / "cluster"
    assert f'worker {sweep} --out {out} --threads "${{SLURM_CPUS_PER_TASK}}"' in script
    assert (tmp_path / "results" / "cluster" / "trials").is_dir()  # sbatch needs the log directory
    assert subprocess.run(["bash", "-n", str(tmp_path / "job.sh")]).returncode == 0


def test_gpu_sweep_asks_for_one_gpu_per_task(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gpu.toml").write_text(SWEEP.format(device="cuda"))
    assert launch("gpu.toml", "--array", "3", "--script", "gpu.sh", "--mem", "64G",
                  "--setup", "module load cuda/12.4") == 0
    script = (tmp_path / "gpu.sh").read_text()
    opts = sbatch_lines(script)
    assert {"--array=0-2", "--gres=gpu:1", "--cpus-per-task=8", "--mem=64G"} <= set(opts)
    assert "module load cuda/12.4\n" in script
    assert "--threads" not in script


def test_database_password_stays_out_of_the_script(sweep, tmp_path, capsys):
    url = f"postgresql://bench:{PASSWORD}@db.cluster:5432/sweeps"
    assert launch(str(sweep), "--storage", url, "--array", "2", "--script", "pg.sh") == 0
    out = capsys.readouterr().out
    script = (tmp_path / "pg.sh").read_text()
    assert PASSWORD not in script + out
    assert "postgresql://bench:***@db.cluster:5432/sweeps" in out
    assert ': "${STABENCH_STORAGE:?export STABENCH_STORAGE=postgresql://bench:***@db.cluster:5432/sweeps' in script


def test_submit_passes_the_storage_url_in_the_environment(sweep, tmp_path, monkeypatch, capsys):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(textwrap.dedent(f"""\
        #!/bin/bash
        echo "$@" > {tmp_path}/sbatch.args
        echo "$STABENCH_STORAGE" > {tmp_path}/sbatch.env
        echo "4242;cluster"
        """))
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    url = f"postgresql://bench:{PASSWORD}@db.cluster/sweeps"
    assert launch(str(sweep), "--storage", url, "--array", "5", "--submit") == 0
    out = capsys.readouterr().out
    assert "submitted Slurm job 4242" in out and PASSWORD not in out
    script = tmp_path / "results" / "cluster" / "trials" / "slurm.sh"
    assert (tmp_path / "sbatch.args").read_text().split() == ["--parsable", str(script)]
    assert (tmp_path / "sbatch.env").read_text().strip() == url


def test_submit_without_slurm_is_a_clear_error(sweep, monkeypatch, capsys):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert launch(str(sweep), "--array", "2", "--submit") == 2
    assert "sbatch not found" in capsys.readouterr().err


def test_generated_script_runs_a_worker_that_drains_the_sweep(sweep, tmp_path):
    assert launch(str(sweep), "--array", "1", "--script", "job.sh") == 0
    env = {**os.environ, "SLURM_CPUS_PER_TASK": "1", "SLURM_ARRAY_TASK_ID": "0"}
    env.pop("STABENCH_STORAGE", None)
    done = subprocess.run(["bash", str(tmp_path / "job.sh")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "worker done: 2 completed" in done.stdout
    assert len(pq.read_table(tmp_path / "results" / "cluster" / "runs.parquet")) == 2
