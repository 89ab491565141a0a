"""Sweep files: validation before anything runs, grid expansion, the shipped sweeps.

An invalid sweep file is one error line naming the file, the key and what is allowed,
exit code 2, and nothing written. Fast: no training here.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from bench.cli import main
from bench.config import ConfigError, RunConfig
from bench.sweep.grid import expand, study_names, variants
from bench.sweep.spec import load_spec

REPO = Path(__file__).resolve().parents[1]

VALID = """
name = "spec-test"
[train]
steps = 20
warmup = 2
vocab_size = 256
batch_size = 4
seq_len = 32
[grid]
models = ["nano"]
lr = [1e-3, 1e-2]
seeds = [1, 2]
weight_tying = [false, true]
[stabilizers]
baseline = {}
zloss.lam = [1e-4, 1e-1]
softcap.cap = [30.0]
"""


def write(tmp_path: Path, text: str, name: str = "sweep.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def replace(old: str, new: str) -> str:
    assert old in VALID
    return VALID.replace(old, new)


# (what is wrong, sweep text, key named in the error, what the error must allow/say)
INVALID = [
    ("unknown top-level key", 'nmae = "x"\n' + VALID, "nmae", "allowed: name, description, mode, train, grid"),
    ("unknown [train] key", replace("steps = 20", "stpes = 20"), "train.stpes", "allowed: "),
    ("grid axis in [train]", replace("steps = 20", "steps = 20\nlr = 0.1"), "train.lr", "[grid] as lr"),
    ("unknown [grid] key", replace("lr = [", "lrs = ["), "grid.lrs", "allowed: models, lr, seeds, weight_tying"),
    ("unknown [execution] key", VALID + "[execution]\ncheckpoint = 5\n", "execution.checkpoint",
     "allowed: checkpoint_every, max_retries"),
    ("wrong type in a grid", replace("lr = [1e-3, 1e-2]", 'lr = [1e-3, "fast"]'), "grid.lr[1]",
     "valid number; got 'fast'"),
    ("wrong type of a grid", replace("seeds = [1, 2]", "seeds = 1"), "grid.seeds", "valid list"),
    ("wrong type in [train]", replace("steps = 20", 'steps = "many"'), "train.steps", "valid integer"),
    ("wrong type of a hyperparameter", replace("cap = [30.0]", 'cap = ["big"]'), "stabilizers.softcap.cap[0]",
     "valid number"),
    ("empty learning-rate grid", replace("lr = [1e-3, 1e-2]", "lr = []"), "grid.lr", "must not be empty"),
    ("empty hyperparameter grid", replace("lam = [1e-4, 1e-1]", "lam = []"), "stabilizers.zloss.lam",
     "must not be empty"),
    ("no stabilizers", VALID.split("[stabilizers]")[0] + "[stabilizers]\n", "stabilizers", "must not be empty"),
    ("unknown stabilizer", replace("baseline = {}", "zlos = {}"), "stabilizers.zlos",
     "allowed: baseline, mucentering, muloss, softcap, zloss"),
    ("unknown hyperparameter", replace("zloss.lam", "zloss.lambda"), "stabilizers.zloss.lambda", "allowed: lam"),
    ("invalid hyperparameter value", replace("cap = [30.0]", "cap = [-1.0]"), "stabilizers.softcap", "cap"),
    ("unknown model preset", replace('models = ["nano"]', 'models = ["nano", "huge"]'), "grid.models[1]",
     "allowed: nano, micro"),
    ("missing data path", replace("steps = 20", 'steps = 20\ndata = "bin:no/such/shards"'), "train.data",
     "data path not found: no/such/shards"),
    ("unknown mode", 'mode = "random"\n' + VALID, "mode", "'grid' or 'search'"),
    ("unusable train value", replace("warmup = 2", "warmup = 50"), "train.warmup", "must be < steps"),
    ("checkpoint cadence off the log cadence", VALID + "[execution]\ncheckpoint_every = 7\n",
     "execution.checkpoint_every", "multiple of train.log_every"),
    ("precision both in [train] and [grid]", replace("steps = 20", 'steps = 20\nprecision = "fp32"')
     .replace("seeds = [1, 2]", 'seeds = [1, 2]\nprecision = ["fp32"]'), "train.precision", "grid.precision"),
    ("unknown precision in the grid", replace("seeds = [1, 2]", 'seeds = [1, 2]\nprecision = ["fp16"]'),
     "grid.precision[0]", "'bf16-emu'"),
    ("search mode without [search]", 'mode = "search"\n' + VALID, "search", "trials, lr_min, lr_max"),
]


@pytest.mark.parametrize("what,text,key,allowed", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_sweep_file_is_one_clear_error_and_writes_nothing(tmp_path, monkeypatch, capsys, what, text,
                                                                   key, allowed):
    path = write(tmp_path, text)
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    rc = main(["sweep", str(path), "--workers", "2"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"stabench sweep: error: {path}: {key}: "), err
    assert allowed in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no results/, no journal


@pytest.mark.parametrize("command", [["worker"], ["launch", "slurm", "--array", "2"]])
def test_worker_and_launch_validate_the_sweep_file_first(tmp_path, monkeypatch, capsys, command):
    path = write(tmp_path, replace("baseline = {}", "zlos = {}"))
    monkeypatch.chdir(tmp_path)
    assert main([*command, str(path)]) == 2
    assert f"{path}: stabilizers.zlos: unknown stabilizer" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.toml"]


def test_grid_expands_to_one_trial_per_point_keyed_by_the_resolved_config(tmp_path):
    spec = load_spec(write(tmp_path, VALID))
    points = expand(spec)
    # models × tying × seeds × (baseline + 2 z-loss λ + 1 cap) × lr
    assert len(points) == 1 * 2 * 2 * (1 + 2 + 1) * 2
    assert len({p.key for p in points}) == len(points)
    for p in points:
        assert p.key == p.config.key()
        assert p.config.sweep == "spec-test"
        assert (p.config.steps, p.config.vocab_size, p.config.model) == (20, 256, "nano")
    zl = [p.config for p in points if p.config.stabilizer == "zloss"]
    assert sorted({c.hparams["lam"] for c in zl}) == [1e-4, 1e-1]
    expected = RunConfig(model="nano", stabilizer="zloss", hparams={"lam": 0.1}, weight_tying=True, lr=1e-2,
                         steps=20, warmup=2, vocab_size=256, batch_size=4, seq_len=32, seed=2)
    assert expected.key() in {p.key for p in points}


def test_keys_do_not_depend_on_how_trials_run(tmp_path):
    a = load_spec(write(tmp_path, VALID, "a.toml"))
    b = load_spec(write(tmp_path, replace('name = "spec-test"', 'name = "other"')
                        + "[execution]\ncheckpoint_every = 10\nmax_retries = 5\n", "b.toml"))
    assert [p.key for p in expand(a)] == [p.key for p in expand(b)]


def test_third_party_stabilizer_with_its_own_grid(tmp_path, monkeypatch):
    (tmp_path / "mystab.py").write_text(textwrap.dedent("""
        from dataclasses import dataclass
        from bench.stabilizers import Stabilizer

        @dataclass(frozen=True)
        class Scaled(Stabilizer):
            name = "scaled"
            alpha: float = 1.0

            def transform_logits(self, logits):
                return self.alpha * logits
        """))
    monkeypatch.chdir(tmp_path)
    text = VALID.split("[stabilizers]")[0] + '[stabilizers]\n"mystab.py:Scaled".alpha = [0.5, 1.0, 2.0]\n'
    spec = load_spec(write(tmp_path, text))
    points = expand(spec)
    assert len(points) == 2 * 2 * 3 * 2
    assert {p.config.stabilizer for p in points} == {"mystab.py:Scaled"}
    bad = text.replace(".alpha", ".beta")
    with pytest.raises(ConfigError, match=r'stabilizers\."mystab.py:Scaled"\.beta: .*allowed: alpha'):
        load_spec(write(tmp_path, bad))


def test_search_mode_is_one_study_per_variant_with_an_lr_range(tmp_path):
    search = "[search]\ntrials = 4\nlr_min = 1e-4\nlr_max = 1.0\n"
    text = 'mode = "search"\n' + replace("lr = [1e-3, 1e-2]\n", "") + search
    spec = load_spec(write(tmp_path, text))
    assert len(study_names(spec)) == len(variants(spec)) == 2 * 2 * 4
    assert all(n.startswith("spec-test/nano-") for n in study_names(spec))
    with pytest.raises(ConfigError, match=r"grid.lr: not allowed"):
        load_spec(write(tmp_path, 'mode = "search"\n' + VALID + search))


def test_quick_sweep_shows_the_study_shape_on_a_cpu():
    spec = load_spec(REPO / "sweeps" / "quick.toml")
    points = expand(spec)
    assert spec.name == "quick"
    assert set(spec.stabilizers) == {"baseline", "zloss", "softcap", "muloss", "mucentering"}
    assert len(spec.grid.lr) >= 4
    assert set(spec.grid.models) <= {"nano", "micro"}
    assert all(2048 <= p.config.vocab_size <= 4096 and p.config.steps <= 1000 for p in points)
    assert all(p.config.data == "synthetic" and p.config.device == "cpu" for p in points)


def test_paper_sweep_is_the_reference_gpu_protocol():
    """Every value of the study's protocol (its nanoGPT fork's configs and train.py)."""
    from bench.memory import estimate_eval_bytes, estimate_step_bytes

    spec = load_spec(REPO / "sweeps" / "paper-wortsman.toml", check_data=False)  # shards live on the cluster
    points = expand(spec)
    assert len(points) == 350
    assert spec.grid.models == ["16M", "29M", "57M", "109M", "221M"]
    assert spec.grid.lr == [3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1]
    assert spec.grid.weight_tying == [False, True] and spec.grid.seeds == [1]
    assert {(p.config.stabilizer, tuple(sorted(p.config.hparams.items()))) for p in points} == {
        ("baseline", ()), ("zloss", (("lam", 1e-4),)), ("softcap", (("cap", 30.0),)),
        ("muloss", (("lam", 1e-4),)), ("mucentering", ())}
    for p in points:
        c = p.config
        assert (c.seq_len, c.batch_size, c.steps, c.vocab_size) == (2048, 64, 100_000, 50304)
        assert (c.warmup, c.min_lr) == (5000, 1e-5)
        assert (c.beta1, c.beta2, c.eps, c.weight_decay, c.grad_clip) == (0.9, 0.95, 1e-8, 0.0, 1.0)
        assert c.data.startswith("bin:") and c.precision == "bf16" and c.device == "cuda"
        assert c.tf32 and c.compile
        # the final evaluation covers the study's 2,000 x 16 x 2048 validation tokens
        assert c.resolved_final_eval_batches * c.batch_size * c.seq_len == 2000 * 16 * 2048
        # no early stopping: only a non-finite loss stops a run; the other rules only record
        assert (c.divergence.nonfinite, c.divergence.loss_above_L0, c.divergence.spike) == ("stop", "record", "record")
        assert estimate_step_bytes(c) < 80e9  # one step fits one 80 GB GPU by the memory estimate
        assert estimate_eval_bytes(c) < 80e9  # and so does one evaluation pass
        assert c.head_chunk > 0 and estimate_step_bytes(c) < 40 * 2**30  # chunked head: 3.7-33.9 GiB
    assert spec.execution.checkpoint_every > 0


def test_lambda_sensitivity_sweep():
    spec = load_spec(REPO / "sweeps" / "lambda-sensitivity.toml")
    lams = {(p.config.stabilizer, p.config.hparams.get("lam")) for p in expand(spec)}
    for stab in ("zloss", "muloss"):
        assert {lam for s, lam in lams if s == stab} == {1e-7, 1e-4, 1e-1, 1e2}


def test_precision_is_an_optional_grid_axis(tmp_path):
    spec = load_spec(write(tmp_path, replace("seeds = [1, 2]", 'seeds = [1, 2]\nprecision = ["fp32", "bf16-emu"]')))
    points = expand(spec)
    assert len(points) == 2 * len(expand(load_spec(write(tmp_path, VALID, "plain.toml"))))
    assert {p.config.precision for p in points} == {"fp32", "bf16-emu"}
    assert len({p.key for p in points}) == len(points)
    assert any(p.variant.endswith("-bf16-emu-s1") for p in points)


def test_cpu_study_sweeps_follow_the_issue_protocol():
    """Issue 8: cpu-repro (5 methods, tied+untied, >= 8 lrs, >= 2 sizes, >= 3 seeds, bf16),
    cpu-lambda (z-loss and mu-loss at 1e-7 ... 1e2), cpu-long (>= 20k steps, 3 lrs, fp32 and bf16)."""
    repro = [p.config for p in expand(load_spec(REPO / "sweeps" / "cpu-repro.toml"))]
    assert {c.stabilizer for c in repro} == {"baseline", "zloss", "softcap", "muloss", "mucentering"}
    assert {c.weight_tying for c in repro} == {False, True}
    assert len({c.lr for c in repro}) >= 8 and len({c.model for c in repro}) >= 2
    assert len({c.seed for c in repro}) >= 3 and {c.precision for c in repro} == {"bf16-emu"}
    assert {c.hparams.get("lam") for c in repro if c.stabilizer in ("zloss", "muloss")} == {1e-4}
    lam = [p.config for p in expand(load_spec(REPO / "sweeps" / "cpu-lambda.toml"))]
    for stab in ("zloss", "muloss"):
        assert {c.hparams["lam"] for c in lam if c.stabilizer == stab} == {1e-7, 1e-4, 1e-1, 1e2}
    long = [p.config for p in expand(load_spec(REPO / "sweeps" / "cpu-long.toml"))]
    assert min(c.steps for c in long) >= 20_000 and len({c.lr for c in long}) == 3
    assert {c.stabilizer for c in long} == {"baseline", "mucentering", "muloss"}
    assert {c.precision for c in long} == {"fp32", "bf16-emu"} and len({c.seed for c in long}) == 2
    assert not any(c.weight_tying for c in long)
