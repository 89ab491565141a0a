"""RunConfig fields declare their role in metadata; the lists derived from it equal the ones the
project had written out (the specification below), and ``key()`` stays stable: the committed
results keep their run ids, and a field added later with its default changes no key."""
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from bench.config import (FLAGS, DivergenceConfig, RunConfig, execution_field, fields_with, from_dict,
                          run_field)
from bench.pack.grouping import SHARED_FIELDS
from bench.run_cli import RUN_FLAGS
from bench.sweep.spec import AXES, TRAIN_KEYS

RESULTS = Path(__file__).resolve().parents[1] / "results"

# -- the lists as they were written out before the metadata (the specification) --------------
KEY_V2 = ["model", "arch_version", "stabilizer", "hparams", "weight_tying", "lr", "min_lr", "warmup", "steps", "batch_size",
          "seq_len", "vocab_size", "data", "seed", "data_seed", "beta1", "beta2", "eps", "weight_decay",
          "grad_clip", "precision", "eval_every", "eval_batches", "divergence"]
"""Key version 2: version 1's fields and arch_version (issue 14), which changed every key once."""
EXECUTION_FIELDS = ("sweep", "log_every", "micro_batch_size", "device", "compile", "head_chunk", "adamw", "cpu_gemm", "threads", "log")
SPEC_AXES = {
    "model": "[grid] as models = [...]",
    "lr": "[grid] as lr = [...]",
    "seed": "[grid] as seeds = [...]",
    "weight_tying": "[grid] as weight_tying = [...]",
    "stabilizer": "[stabilizers]",
    "hparams": "[stabilizers] as <stabilizer>.<name> = [...]",
    "sweep": "the top-level name",
}
SPEC_TRAIN_KEYS = ["arch_version", "min_lr", "warmup", "steps", "batch_size", "seq_len", "vocab_size", "data", "data_seed",
                   "beta1", "beta2", "eps", "weight_decay", "grad_clip", "precision", "eval_every",
                   "eval_batches", "final_eval_batches", "divergence", "tf32", "log_every", "micro_batch_size", "device", "compile", "head_chunk", "adamw", "cpu_gemm", "threads", "log"]
SPEC_SHARED_FIELDS = (
    "model", "vocab_size", "seq_len", "weight_tying",
    "data", "batch_size", "steps", "warmup",
    "eval_every", "eval_batches", "log_every",
    "precision", "stabilizer",
    "micro_batch_size", "device", "threads",
    "compile",  # a pack compiles its one batched forward, or not
    "arch_version", "final_eval_batches", "tf32",
    "head_chunk",  # a pack runs the chunked head member by member (one chunk size), or members in chunks
    "cpu_gemm",  # … its products in one library
)
SPEC_RUN_FLAGS = {
    "--model": ("model", str), "--stabilizer": ("stabilizer", str), "--lr": ("lr", float),
    "--min-lr": ("min_lr", float), "--steps": ("steps", int), "--warmup": ("warmup", int),
    "--batch-size": ("batch_size", int), "--micro-batch-size": ("micro_batch_size", int),
    "--seq-len": ("seq_len", int), "--vocab-size": ("vocab_size", int), "--data": ("data", str),
    "--seed": ("seed", int), "--data-seed": ("data_seed", int), "--device": ("device", str),
    "--precision": ("precision", str), "--threads": ("threads", int), "--eval-every": ("eval_every", int),
    "--eval-batches": ("eval_batches", int), "--log-every": ("log_every", int),
    "--weight-decay": ("weight_decay", float), "--grad-clip": ("grad_clip", float),
    "--log": ("log", str),  # experiment tracker (bench.tracking)
}


# -- every field declares a role ----------------------------------------------------------------
@pytest.mark.parametrize("cls", [RunConfig, DivergenceConfig])
def test_every_field_declares_its_role(cls):
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
        assert meta.get("role") in ("run", "execution"), f"{cls.__name__}.{f.name} has no role"
        if meta["role"] == "run":
            assert meta.get("key") in ("always", "if_not_default"), f"{cls.__name__}.{f.name} has no key rule"
        else:
            assert "key" not in meta, f"{cls.__name__}.{f.name}: an execution field is never in the key"
        assert set(meta) <= {"role", "key", *FLAGS}, f"{cls.__name__}.{f.name}: unknown metadata"


def test_ranked_flags_have_distinct_ranks():
    for flag in ("pack_shared", "cli"):
        ranks = [f.metadata[flag] for f in fields_with(flag=flag)]
        assert all(type(r) is int for r in ranks) and len(set(ranks)) == len(ranks), flag


def test_key_version_2_fields_are_frozen():
    """No field may join ``key="always"``: that would change every existing key."""
    assert [f.name for f in fields_with(role="run") if f.metadata["key"] == "always"] == KEY_V2
    assert all(f.metadata["key"] == "always" for f in fields_with(role="run", of=DivergenceConfig))


# -- the derived lists equal the ones written out before -------------------------------------------
def test_derived_lists_equal_the_specification():
    assert RunConfig.EXECUTION_FIELDS == EXECUTION_FIELDS
    assert AXES == SPEC_AXES
    assert TRAIN_KEYS == SPEC_TRAIN_KEYS
    assert SHARED_FIELDS == SPEC_SHARED_FIELDS  # same order: pack_key's tuple, describe_mismatch's message
    assert list(RUN_FLAGS.items()) == list(SPEC_RUN_FLAGS.items())  # same order: `stabench run --help`


def test_metadata_helpers_reject_unknown_names():
    with pytest.raises(TypeError, match="unknown field metadata"):
        run_field(1, shared=True)
    with pytest.raises(ValueError, match="unknown flag"):
        fields_with(flag="shared")


# -- key stability ---------------------------------------------------------------------------------
def _committed(name: str, n: int | None) -> list[tuple[str, dict]]:
    runs = pd.read_parquet(RESULTS / name / "runs.parquet", columns=["run_id", "config"])
    if n is not None and len(runs) > n:
        runs = runs.iloc[:: len(runs) // n][:n]  # spread over the file
    return [(r.run_id, json.loads(r.config)) for r in runs.itertuples()]


@pytest.mark.parametrize("name,n", [("cpu-repro", 20), ("cpu-long", None), ("cpu-lambda", 20)])
def test_committed_run_ids_are_the_keys_of_their_configs(name, n):
    rows = _committed(name, n)
    assert rows
    for run_id, config in rows:
        assert from_dict(config).key() == run_id, (name, config)


@dataclass(frozen=True)
class _Later(RunConfig):
    """RunConfig with fields added later, as the docstring's recipe says."""

    new_knob: float = run_field(0.5)
    new_switch: str = run_field("off", pack_shared=99)
    new_placement: str = execution_field("here")


@dataclass(frozen=True)
class _LaterDivergence(DivergenceConfig):
    new_rule: int = run_field(0)


def _later(cfg: RunConfig, **changes) -> _Later:
    return _Later(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(RunConfig)}, **changes)


def test_a_field_added_with_its_default_changes_no_key():
    assert _Later().key() == RunConfig().key()
    run_id, config = _committed("cpu-repro", 1)[0]
    cfg = from_dict(config)
    assert _later(cfg).key() == run_id
    assert _later(cfg, new_placement="there").key() == run_id  # execution: never in the key
    assert dataclasses.replace(_later(cfg), divergence=_LaterDivergence(**dataclasses.asdict(cfg.divergence))
                               ).key() == run_id  # nested alike


def test_a_field_added_with_another_value_changes_the_key():
    base = _Later().key()
    keys = {base, _Later(new_knob=0.7).key(), _Later(new_switch="on").key(),
            _Later(new_knob=0.7, new_switch="on").key(), _Later(divergence=_LaterDivergence(new_rule=1)).key()}
    assert len(keys) == 5
    assert _Later(new_knob=0.5).key() == base  # the default, given explicitly: still the old key


def test_execution_fields_do_not_change_the_key():
    cfg = RunConfig()
    for name, value in [("sweep", "other"), ("log_every", 3), ("micro_batch_size", 4), ("device", "cpu"),
                        ("compile", True), ("head_chunk", 0), ("adamw", "foreach"), ("cpu_gemm", "aten"), ("threads", 2)]:
        assert dataclasses.replace(cfg, **{name: value}).key() == cfg.key(), name
    assert dataclasses.replace(cfg, lr=0.1).key() != cfg.key()
