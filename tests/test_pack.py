"""Packed training: K sweep points as one batched model give each point the run train() gives it.

Tolerances (packed member vs independent ``train(cfg)``; |a − b| ≤ rtol·max(|a|, |b|) + atol):

- fp64 runs: rtol 1e-9, atol 1e-12. A member computes exactly the ops of its independent
  run except for summation order (batched vs single GEMMs and reductions, the fused vs
  single-tensor AdamW kernel), i.e. differences of a few ulp (~1e-16) per op, which 30
  training steps amplify to ≤ ~2e-15 relative (observed). 1e-9 leaves a 10^5 margin for
  other platforms and is still 10^7 × below float32 resolution, so a real mistake (another
  member's λ, lr or init, a missed hook) fails by orders of magnitude. Quantities that the
  code computes in float32 on purpose even in fp64 runs (μ statistics via ``E.float()``,
  μ-loss's term) get float32's rtol 1e-5; ``mu_hidden_cos`` is not compared where μ is at
  round-off level (μ-centering), where its direction is noise in both runs.
- fp32 runs: rtol 1e-4, atol 1e-6 over 30 steps: float32 rounding (6e-8) amplified by
  training; observed ≤ 3e-6.
Timing fields and the start time are not compared.
"""
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from bench import records
from bench.pack import group_into_packs, pack_key, train_pack
from bench.pack.hooks import PackedStabilizer, PackError
from bench.pack.optim import PackedAdamW
from bench.pack.store import FlatParams
from bench.records import CURVE_COLUMNS, RUN_COLUMNS
from bench.trainer import train
from helpers import tiny_config

PLUGIN = Path(__file__).parent / "plugins" / "my_stabilizers.py"
TIMING = {"wall_time_s", "step_time_s", "tokens_per_s", "started_at"}
FLOAT32_BY_DESIGN = {"mu_norm", "isotropy", "mu_hidden_cos"}
FP64 = dict(rtol=1e-9, atol=1e-12)
FP32 = dict(rtol=1e-4, atol=1e-6)


def _close(a, b, rtol, atol) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        if a == b:  # also ±inf
            return True
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return abs(a - b) <= rtol * max(abs(a), abs(b)) + atol
    return a == b


def assert_same_run(packed, solo, rtol, atol, float32_fields=()):
    """Same run row (but timing) and same curve rows, within tolerance; keys and order identical."""
    assert list(packed.run) == list(solo.run)
    assert [list(r) for r in packed.curve] == [list(r) for r in solo.curve]
    mu_is_noise = solo.run["mu_norm"] < 1e-6

    def check(where, row_p, row_s):
        for key, a in row_p.items():
            if key in TIMING or (key == "mu_hidden_cos" and mu_is_noise):
                continue
            loose = key in FLOAT32_BY_DESIGN or key in float32_fields
            r = max(rtol, 1e-5) if loose else rtol
            assert _close(a, row_s[key], r, atol), f"{where} {key}: packed {a!r} vs independent {row_s[key]!r}"

    check("run", packed.run, solo.run)
    for rp, rs in zip(packed.curve, solo.curve):
        check(f"curve step {rs['step']}", rp, rs)


def _pack_vs_solo(cfgs, tol, float32_fields=()):
    packed = train_pack(cfgs)
    assert [r.run["run_id"] for r in packed] == [c.key() for c in cfgs]
    for cfg, p in zip(cfgs, packed):
        assert_same_run(p, train(cfg), **tol, float32_fields=float32_fields)
    return packed


def _members(stabilizer, hparams, lrs, **kw):
    return [tiny_config(stabilizer=stabilizer, hparams=hp, lr=lr, seed=i + 1, data_seed=7, **kw)
            for i, (hp, lr) in enumerate(zip(hparams, lrs))]


LRS = [3e-3, 1e-2, 3e-2, 1e-3]
LAMS = [{"lam": 1e-4}, {"lam": 1e-2}, {"lam": 1e-3}, {"lam": 0.1}]


# --- equivalence with independent runs ------------------------------------------------------

# The head of a pack: head_chunk > 0 runs the chunked head member by member (48 tokens: 128 tokens per
# batch in three chunks, the last one short); head_chunk = 0 the unchunked head over chunks of members.
HEADS = pytest.mark.parametrize("head_chunk", [48, 0], ids=["chunked-head", "member-chunks"])


@HEADS
@pytest.mark.parametrize("stabilizer", ["zloss", "muloss"])
def test_four_members_differing_in_lr_lambda_and_seed_match_independent_runs_fp64(stabilizer, head_chunk):
    cfgs = _members(stabilizer, LAMS, LRS, precision="fp64", head_chunk=head_chunk)
    packed = _pack_vs_solo(cfgs, FP64, float32_fields={"reg_loss"} if stabilizer == "muloss" else ())
    assert len({r.run["final_loss"] for r in packed}) == 4  # the members really differ


@HEADS
def test_softcap_members_with_different_caps_match_independent_runs_fp64(head_chunk):
    caps = [{"cap": 2.0}, {"cap": 5.0}, {"cap": 30.0}, {"cap": 10.0}]
    _pack_vs_solo(_members("softcap", caps, LRS, precision="fp64", head_chunk=head_chunk), FP64)


@HEADS
@pytest.mark.parametrize("tied", [False, True])
def test_mucentering_pack_matches_independent_runs_fp64(tied, head_chunk):
    # with weight tying, micro-batches and weight decay: the after_step hook, accumulation and decay paths
    cfgs = _members("mucentering", [{}] * 4, LRS, precision="fp64", weight_tying=tied,
                    micro_batch_size=2, weight_decay=0.1, head_chunk=head_chunk)
    packed = _pack_vs_solo(cfgs, FP64)
    assert all(r.run["mu_norm"] < 1e-6 for r in packed)  # E stayed centred (to float32 round-off)


def test_fp32_pack_matches_independent_runs_within_float32_tolerance():
    _pack_vs_solo(_members("zloss", LAMS, LRS, precision="fp32"), FP32)


def test_third_party_stabilizer_is_vectorized_over_its_hyperparameter():
    spec = f"{PLUGIN}:LogitL2"
    _pack_vs_solo(_members(spec, [{"lam": 1e-3}, {"lam": 0.1}], LRS[:2], precision="fp64"), FP64)


# --- isolation --------------------------------------------------------------------------------

def test_planted_diverging_members_are_recorded_and_leave_their_neighbours_unchanged():
    kw = dict(stabilizer="zloss", precision="fp64", data_seed=7, steps=40, warmup=5)
    cfgs = [tiny_config(lr=3e-3, seed=1, hparams={"lam": 1e-4}, **kw),
            tiny_config(lr=10.0, seed=2, hparams={"lam": 1e-4}, **kw),   # loss blows up
            tiny_config(lr=1e-2, seed=3, hparams={"lam": 1e-3}, **kw),
            tiny_config(lr=1e30, seed=4, hparams={"lam": 1e-4}, **kw)]   # NaN/Inf in its parameters
    packed = train_pack(cfgs)
    solo = [train(c) for c in cfgs]
    for i in (0, 2):
        assert not packed[i].run["diverged"]
        assert_same_run(packed[i], solo[i], **FP64)
    for i in (1, 3):
        p, s = packed[i].run, solo[i].run
        assert p["diverged"] and s["diverged"]
        for key in ("diverged_step", "diverged_reason", "steps_done"):
            assert p[key] == s[key], key
        assert len(packed[i].curve) == len(solo[i].curve)
        assert packed[i].curve[-1]["val_loss"] is not None  # evaluated when it stopped, as train() does
    assert packed[3].run["diverged_reason"] == "nonfinite"
    assert packed[3].run["steps_done"] < 40


# --- records -----------------------------------------------------------------------------------

def test_one_run_row_per_member_with_the_records_schema(tmp_path):
    cfgs = _members("zloss", LAMS[:3], LRS[:3], steps=10, eval_every=5)
    results = train_pack(cfgs)
    for cfg, r in zip(cfgs, results):
        assert set(r.run) == {c for c, _, _ in RUN_COLUMNS}
        assert all(set(row) == {c for c, _, _ in CURVE_COLUMNS} for row in r.curve)
        assert r.run["run_id"] == cfg.key() and r.run["lr"] == cfg.lr and r.run["lam"] == cfg.hparams["lam"]
        assert r.run["wall_time_s"] > 0 and r.run["steps_done"] == 10
        records.write_run(tmp_path, r.run, r.curve)
    runs = records.read_runs(tmp_path)
    assert sorted(runs["run_id"]) == sorted(c.key() for c in cfgs)
    assert len(records.read_curves(tmp_path)) == sum(len(r.curve) for r in results)


# --- grouping ------------------------------------------------------------------------------------

def test_pack_key_separates_what_must_be_shared_and_ignores_what_members_own():
    base = tiny_config(stabilizer="zloss", hparams={"lam": 1e-4}, data_seed=3)
    same = [base.replace(lr=0.1), base.replace(hparams={"lam": 1.0}), base.replace(seed=9), base.replace(min_lr=0.0),
            base.replace(weight_decay=0.1, grad_clip=0.0), base.replace(sweep="other")]
    assert all(pack_key(c) == pack_key(base) for c in same)
    different = [base.replace(model="micro"), base.replace(vocab_size=512), base.replace(data_seed=4),
                 base.replace(stabilizer="muloss"), base.replace(steps=40), base.replace(precision="fp64"),
                 base.replace(batch_size=8), base.replace(weight_tying=True), base.replace(log_every=10)]
    assert all(pack_key(c) != pack_key(base) for c in different)
    # without an explicit data seed the init seed is the data seed: different seeds, different batches
    assert pack_key(tiny_config(seed=1)) != pack_key(tiny_config(seed=2))


def test_group_into_packs_keeps_order_and_balances_pack_sizes():
    a = [tiny_config(lr=0.001 * (i + 1), data_seed=1) for i in range(10)]
    b = [tiny_config(lr=0.001 * (i + 1), data_seed=2) for i in range(3)]
    mixed = [c for pair in zip(a, b) for c in pair] + a[3:]
    packs = group_into_packs(mixed, 8)
    assert [len(p) for p in packs] == [5, 5, 3]
    assert packs[0] + packs[1] == a and packs[2] == b
    assert [len(p) for p in group_into_packs(a, 1)] == [1] * 10
    assert sum(map(len, group_into_packs(a, "auto"))) == 10
    with pytest.raises(ValueError):
        group_into_packs(a, 0)


def test_incompatible_configs_are_refused_with_the_differing_fields():
    with pytest.raises(ValueError, match="vocab_size"):
        train_pack([tiny_config(data_seed=1), tiny_config(data_seed=1, vocab_size=512)])


def test_hooks_that_cannot_run_under_vmap_are_refused_by_name():
    from dataclasses import dataclass
    import sys
    import types

    from bench.stabilizers import Stabilizer

    @dataclass(frozen=True)
    class Branchy(Stabilizer):
        name = "branchy"
        lam: float = 1.0

        def loss_term(self, inputs):
            return self.lam * inputs.lse.mean() if self.lam > 0.5 else None  # data-dependent control flow

    sys.modules["_pack_test_plugins"] = types.SimpleNamespace(Branchy=Branchy)
    stab = PackedStabilizer("_pack_test_plugins:Branchy", [{"lam": 1.0}, {"lam": 0.2}], torch.float64,
                            torch.device("cpu"))
    with pytest.raises(PackError, match="Branchy"):
        stab.loss(torch.randn(2, 1, 3, 5, dtype=torch.float64), torch.randn(2, 1, 3, 4, dtype=torch.float64),
                  torch.randn(2, 5, 4, dtype=torch.float64), torch.zeros(1, 3, dtype=torch.long))


# --- building blocks -------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap's loop over CPU flash attention
@pytest.mark.parametrize("tied", [False, True])
def test_batched_forward_equals_vmap_of_the_gpt_module(tied):
    """The hand-batched forward is GPT.forward member by member (guards against drift from model.py)."""
    from torch.func import functional_call

    from bench.model import GPT, preset
    from bench.pack.batched_model import packed_forward

    cfg = preset("micro", vocab_size=97, seq_len=16, weight_tying=tied)
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(GPT(cfg).double())
    store = FlatParams.from_models(models)
    x = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    logits, hidden = packed_forward(cfg, store.params, x, models[0].rope_cos, models[0].rope_sin)
    params = {n: p.detach() for n, p in store.params.items()}
    ref_logits, ref_hidden = torch.vmap(lambda p: functional_call(models[0], p, (x,)))(params)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hidden, ref_hidden, rtol=1e-12, atol=1e-12)
    for k, m in enumerate(models):  # and member k is model k
        torch.testing.assert_close(logits[k], m(x)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fused", [True, False])
def test_packed_adamw_with_clipping_equals_torch_adamw_per_member(fused):
    torch.manual_seed(0)
    shapes = {"w": (6, 5), "v": (5,)}
    members = [{n: torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for n, s in shapes.items()}
               for _ in range(3)]
    hyper = [dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, clip=0.5),
             dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.0, clip=math.inf),
             dict(lr=1e-1, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.3, clip=10.0)]
    refs = [torch.optim.AdamW([{"params": [m["w"]], "weight_decay": h["weight_decay"]},
                               {"params": [m["v"]], "weight_decay": 0.0}],
                              lr=h["lr"], betas=h["betas"], eps=h["eps"]) for m, h in zip(members, hyper)]

    class _M(torch.nn.Module):
        def __init__(self, ps):
            super().__init__()
            self.w, self.v = (torch.nn.Parameter(ps[n].detach().clone()) for n in ("w", "v"))

    store = FlatParams.from_models([_M(m) for m in members])
    opt = PackedAdamW(store, betas=[h["betas"] for h in hyper], eps=[h["eps"] for h in hyper],
                      weight_decay=[h["weight_decay"] for h in hyper], grad_clip=[h["clip"] for h in hyper],
                      fused=fused)
    for step in range(5):
        grads = [{n: torch.randn(s, dtype=torch.float64) * 10 ** (step - 2) for n, s in shapes.items()}
                 for _ in members]
        for m, g, ref, h in zip(members, grads, refs, hyper):
            for n in shapes:
                m[n].grad = g[n].clone()
            ref_norm = torch.nn.utils.clip_grad_norm_(list(m.values()), h["clip"])
            ref.step()
        FlatParams.write_grads(store.grad, [torch.stack([g[s.name] for g in grads]) for s in store.slots], add=False)
        norms = opt.clip_grad_norm_()
        opt.step([h["lr"] for h in hyper])
        torch.testing.assert_close(norms[-1], ref_norm, rtol=1e-12, atol=0)
        for k, m in enumerate(members):
            for n in shapes:
                torch.testing.assert_close(store.params[n][k], m[n].detach(), rtol=1e-12, atol=1e-14)


def test_emulated_bf16_is_refused_in_packs():
    from bench.pack import train_pack
    cfgs = [tiny_config(precision="bf16-emu", lr=lr) for lr in (1e-3, 1e-2)]
    with pytest.raises(ValueError, match="bf16-emu"):
        train_pack(cfgs)


# --- checkpoint and resume (the one loop) ---------------------------------------------------------

def test_a_pack_resumes_from_its_checkpoint_with_every_member_as_uninterrupted(tmp_path):
    kw = dict(stabilizer="zloss", precision="fp64", data_seed=7, steps=40, warmup=5)
    cfgs = [tiny_config(lr=3e-3, seed=1, hparams={"lam": 1e-4}, **kw),
            tiny_config(lr=1e30, seed=2, hparams={"lam": 1e-4}, **kw),   # diverges (and is frozen) before step 20
            tiny_config(lr=1e-2, seed=3, hparams={"lam": 1e-3}, **kw)]
    full = train_pack(cfgs)
    assert full[1].run["diverged"] and full[1].run["steps_done"] < 20
    ckpt = tmp_path / "pack.pt"
    assert train_pack(cfgs, checkpoint=ckpt, checkpoint_every=10, stop_at=20) is None
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == 20 and state["keys"] == [c.key() for c in cfgs] and len(state["active"]) == 2
    state["members"][0]["curve"][0]["reg_loss"] = marker = -1.0  # shows that the steps before 20 came from here
    torch.save(state, ckpt)
    resumed = train_pack(cfgs[::-1], checkpoint=ckpt, checkpoint_every=10)[::-1]  # members in another order
    assert not ckpt.exists()
    assert resumed[0].curve[0]["reg_loss"] == marker
    resumed[0].curve[0]["reg_loss"] = full[0].curve[0]["reg_loss"]
    for a, b in zip(resumed, full):
        # bit for bit; DataFrame.equals counts NaN = NaN (the diverged member), which == on dicts
        # does only when both hold the same NaN object
        assert pd.DataFrame(a.curve).equals(pd.DataFrame(b.curve)), (a.curve, b.curve)
        assert_same_run(a, b, rtol=0, atol=0)


def test_a_checkpoint_of_other_members_is_not_resumed_from(tmp_path):
    cfgs = _members("zloss", LAMS[:2], LRS[:2], precision="fp64", steps=20)
    ckpt = tmp_path / "pack.pt"
    train_pack(cfgs, checkpoint=ckpt, checkpoint_every=10, stop_at=10)
    other = [cfgs[0], cfgs[1].replace(lr=5e-3)]
    resumed = train_pack(other, checkpoint=ckpt, checkpoint_every=10)
    for a, b in zip(resumed, train_pack(other)):
        assert a.curve == b.curve  # trained from step 0, not from the foreign checkpoint


def test_member_stabilizers_are_built_by_their_constructor_under_vmap():
    """No instance is made around ``__post_init__``: the validation of a plug-in runs inside the pack too."""
    from dataclasses import dataclass
    import sys
    import types

    from bench.stabilizers import Stabilizer

    calls = []

    @dataclass(frozen=True)
    class Counted(Stabilizer):
        name = "counted"
        lam: float = 1e-3

        def __post_init__(self):
            calls.append(type(self.lam).__name__)

        def loss_term(self, inputs):
            return self.lam * inputs.lse.square().mean()

    sys.modules["_pack_test_counted"] = types.SimpleNamespace(Counted=Counted)
    stab = PackedStabilizer("_pack_test_counted:Counted", [{"lam": 1e-3}, {"lam": 1e-2}], torch.float64,
                            torch.device("cpu"))
    assert calls == ["float", "float"]  # every member validated with its plain value
    stab.loss(torch.randn(2, 1, 3, 5, dtype=torch.float64), torch.randn(2, 1, 3, 4, dtype=torch.float64),
              torch.randn(2, 5, 4, dtype=torch.float64), torch.zeros(1, 3, dtype=torch.long))
    assert calls[2:] == ["Tensor"]  # and once more on the vmapped values


def test_an_invalid_member_hyperparameter_is_refused_before_a_pack_trains():
    from bench.config import ConfigError

    cfgs = _members("zloss", LAMS[:2], LRS[:2])
    with pytest.raises(ConfigError, match="lam"):
        train_pack([cfgs[0], cfgs[1].replace(hparams={"lam": -1.0})])
