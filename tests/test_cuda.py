"""What one CUDA GPU must do before a sweep is sent to it (the ``cuda`` marker; ``stabench device-check``).

These tests run on ``$STABENCH_TEST_DEVICE`` (default ``cuda``). The default test command deselects
them (``-m "not cuda"`` in pyproject.toml); ``stabench device-check`` runs them: on a GPU node with
``--device cuda``, and in CI with ``--device cpu --quick`` (the dry run, same tests on the CPU, so
they never rot). Asked for CUDA where there is none, they skip and say how to run them.

bf16 tolerance: a pack member and its unpacked run see the same batches, init and hyperparameters;
in bf16 autocast batched and single GEMMs round differently (bf16 has 8 significand bits: 4e-3
relative per rounding), which 10 steps of training amplify. Final losses must agree within 2e-2
relative, curves within 5e-2: a mistake (another member's lr, a missed hook) moves a loss by far
more at these learning rates.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from bench.pack import train_pack
from bench.trainer import train
from helpers import tiny_config

pytestmark = pytest.mark.cuda
DEVICE = os.environ.get("STABENCH_TEST_DEVICE", "cuda")
BUILTINS = [("baseline", {}), ("zloss", {"lam": 1e-4}), ("softcap", {"cap": 30.0}), ("muloss", {"lam": 1e-4}),
            ("mucentering", {})]
BF16_FINAL, BF16_CURVE = 2e-2, 5e-2


@pytest.fixture(autouse=True)
def _needs_device():
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device here: run `stabench device-check --device cuda` on a GPU node "
                    "(the CPU dry run: `stabench device-check --device cpu --quick`)")


def cfg(**kw):
    return tiny_config(**{**dict(device=DEVICE, precision="bf16", steps=10, warmup=2, eval_every=5, log_every=5,
                                 data_seed=7), **kw})


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("name,hp", BUILTINS, ids=[b[0] for b in BUILTINS])
def test_every_stabilizer_trains_in_bf16_autocast_with_the_fused_optimizer(name, hp, tied):
    from bench.train_module import SingleModule

    c = cfg(stabilizer=name, hparams=hp, weight_tying=tied)
    module = SingleModule(c)
    assert module.precision == "bf16" and module.device.type == DEVICE
    assert module.opt.param_groups[0]["fused"] is True  # fused AdamW (the default on every device)
    from bench.trainer import train_members
    (res,) = train_members([c], module=module)
    r = res.run
    assert r["precision"] == "bf16" and not r["diverged"] and r["steps_done"] == 10
    assert math.isfinite(r["final_loss"]) and math.isfinite(r["final_loss_fp32"])
    assert r["final_loss"] < r["L0"] + 0.5
    if name == "mucentering":
        assert r["mu_norm"] < 1e-2  # E is centred after every step (in fp32 master weights)


def test_a_compiled_run_follows_the_eager_run():
    eager = train(cfg()).run
    compiled = train(cfg(compile=True)).run
    assert compiled["final_loss"] == pytest.approx(eager["final_loss"], rel=BF16_FINAL)


def test_a_pack_equals_its_unpacked_runs_within_bf16_tolerance():
    cfgs = [cfg(lr=lr, seed=s, stabilizer="zloss", hparams={"lam": lam})
            for lr, s, lam in ((3e-3, 1, 1e-4), (1e-2, 2, 1e-3), (3e-3, 3, 1e-2))]
    packed = train_pack(cfgs)
    for p, c in zip(packed, cfgs):
        solo = train(c)
        assert p.run["run_id"] == solo.run["run_id"]
        assert p.run["final_loss"] == pytest.approx(solo.run["final_loss"], rel=BF16_FINAL)
        for a, b in zip(p.curve, solo.curve):
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=BF16_CURVE)


def test_a_diverging_member_of_a_pack_leaves_its_neighbours_as_their_unpacked_runs():
    cfgs = [cfg(lr=3e-3, seed=1), cfg(lr=1e30, seed=2), cfg(lr=1e-2, seed=3)]
    packed = train_pack(cfgs)
    assert packed[1].run["diverged"] and packed[1].run["steps_done"] < 10
    for i in (0, 2):
        solo = train(cfgs[i]).run
        assert not packed[i].run["diverged"]
        assert packed[i].run["final_loss"] == pytest.approx(solo["final_loss"], rel=BF16_FINAL)


def test_a_run_resumes_from_its_checkpoint_on_the_device(tmp_path):
    c = cfg(steps=20)
    full = train(c)
    ckpt = tmp_path / "run.pt"
    from bench.trainer import train_members
    assert train_members([c], checkpoint=ckpt, checkpoint_every=10, stop_at=10) is None
    state = torch.load(ckpt, weights_only=True, map_location="cpu")
    assert state["step"] == 10
    (resumed,) = train_members([c], checkpoint=ckpt, checkpoint_every=10)
    assert not ckpt.exists()
    assert resumed.run["steps_done"] == 20
    assert resumed.run["final_loss"] == pytest.approx(full.run["final_loss"], rel=BF16_FINAL)


def test_the_chunked_head_on_the_device_keeps_an_underflowing_target_exact():
    """The device's branch of the head's underflow guard (``torch.where``, no host sync): a target
    150 nats below its row's logits has fp32 probability 0, yet its loss equals float64's."""
    from bench.head import chunked_head

    torch.manual_seed(0)
    h, E = torch.randn(8, 4, dtype=torch.float64), torch.randn(64, 4, dtype=torch.float64)
    y = torch.randint(0, 64, (8,))
    E[y[0]] = -150 * h[0] / h[0].norm() ** 2
    want = chunked_head(h, E, y, chunk=3)
    got = chunked_head(h.float().to(DEVICE), E.float().to(DEVICE), y.to(DEVICE), chunk=3)
    assert float(got[1]) == pytest.approx(float(want[1]), rel=1e-6)
    torch.testing.assert_close(got[3].double().cpu(), want[3], rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("chunk", [0, 256], ids=["unchunked", "chunked"])
def test_the_memory_estimate_matches_a_step_on_the_device(chunk):
    """``estimate_step_bytes`` (what sizes micro-batches and packs) against the allocation of one step
    above the resident weights and AdamW moments (3·P·4 bytes). Measured on an H200 (bf16, 16 × 2048
    tokens, V = 50,304): 1.00-1.03× of it eager from 16M to 221M (results/perf/gpu-nvidia-h200*)."""
    from bench.memory import estimate_step_bytes, measure_peak_bytes
    from bench.model import count_params
    from bench.train_module import SingleModule

    c = cfg(model="micro", vocab_size=2048, seq_len=128, batch_size=8, head_chunk=chunk)
    m = SingleModule(c)
    x = torch.randint(0, 2048, (8, 128), device=m.device)
    for _ in range(3):  # AdamW's moments exist after the first step
        m.train_batch(x, x, [1e-3], False)
    measured = measure_peak_bytes(lambda: m.train_batch(x, x, [1e-3], False), m.device)
    if measured is None:
        pytest.skip("peak memory is not measurable here (no profiler allocation events)")
    allocated = estimate_step_bytes(c) - 3 * count_params(c.model_config()) * 4
    assert 0.5 * allocated <= measured <= 2 * allocated, (measured / 2**20, allocated / 2**20)
