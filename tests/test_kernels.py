"""The training step's kernels: AdamW's fused kernel or its foreach path (``RunConfig.adamw``), the
loss head's softmax formulation, and the records that say which kernels trained them.

Today's defaults (fused AdamW, the chunked head) round differently from the kernels the committed
CPU results were trained with (AdamW's foreach path, the unchunked log-softmax head). A stored
config from before ``adamw`` existed therefore reads with those kernels (``from_stored``), and the
sweep file of every committed result pins them, so re-running it reproduces its bits on its CPU.
"""
from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import pandas as pd
import pytest
import torch

from bench import gemm
from bench.config import DEFAULT_HEAD_CHUNK, RunConfig, from_dict, from_stored, upgrade_stored
from bench.head import P_TARGET_FLOOR, chunked_head
from bench.train_module import SingleModule

from helpers import tiny_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("stored, kernels", [
    ({"device": "cpu"}, ("foreach", 0)),  # before the chunked head: unchunked
    ({"device": "cpu", "head_chunk": 1024}, ("foreach", 0)),  # one chunk held 8 x 64 tokens: as unchunked
    ({"device": "cpu", "head_chunk": 1024, "batch_size": 32}, ("foreach", 1024)),  # several chunks: kept
    ({"device": "cpu", "head_chunk": 64, "micro_batch_size": 1}, ("foreach", 0)),  # 64 tokens per pass
    ({"device": "cuda", "head_chunk": 1024, "batch_size": 64, "seq_len": 2048}, ("fused", 1024)),  # a GPU run
    ({"device": "cuda"}, ("fused", DEFAULT_HEAD_CHUNK)),  # a GPU run before the CUDA default: the chunk it had
], ids=["cpu-unchunked", "cpu-one-chunk", "cpu-chunks", "cpu-micro-batches", "cuda", "cuda-before-its-default"])
def test_a_stored_config_from_before_adamw_reads_with_the_kernels_that_trained_it(stored, kernels):
    old = {k: v for k, v in RunConfig().to_dict().items() if k not in ("adamw", "head_chunk")}
    old.update(stored)
    upgraded = upgrade_stored(old)
    assert (upgraded["adamw"], upgraded.get("head_chunk", DEFAULT_HEAD_CHUNK)) == kernels


def test_a_run_on_cuda_that_sets_no_head_chunk_gets_the_gpu_chunk():
    """256-token chunks suit a CPU's cache; on a GPU their GEMMs are short (an H200 step 0.66-0.85x the
    unchunked head's at 256, 0.88-0.97x at 4096): CUDA runs that set none get 4096."""
    from bench.config import DEFAULT_HEAD_CHUNK_CUDA

    assert (DEFAULT_HEAD_CHUNK, DEFAULT_HEAD_CHUNK_CUDA) == (256, 4096)
    assert from_dict({"device": "cuda"}).head_chunk == DEFAULT_HEAD_CHUNK_CUDA
    assert from_dict({"device": "cpu"}).head_chunk == DEFAULT_HEAD_CHUNK
    assert from_dict({}).head_chunk == (DEFAULT_HEAD_CHUNK_CUDA if torch.cuda.is_available() else DEFAULT_HEAD_CHUNK)
    assert from_dict({"device": "cuda", "head_chunk": 256}).head_chunk == 256  # a set chunk is kept
    assert from_dict({"device": "cuda", "head_chunk": 0}).head_chunk == 0
    assert from_stored(from_dict({"device": "cuda"}).to_dict()).head_chunk == DEFAULT_HEAD_CHUNK_CUDA
    before = {k: v for k, v in RunConfig(device="cuda").to_dict().items() if k not in ("adamw", "head_chunk")}
    assert from_stored(before).head_chunk == DEFAULT_HEAD_CHUNK  # stored before this default: the chunk it had


def test_todays_stored_configs_read_unchanged_and_kernels_never_change_the_key():
    assert from_stored(RunConfig().to_dict()) == RunConfig()
    assert upgrade_stored({"adamw": "fused", "head_chunk": 64, "device": "cpu"})["head_chunk"] == 64
    old = RunConfig().to_dict()
    del old["adamw"]
    assert from_stored(old).key() == RunConfig().key()  # execution fields: the same run


def test_every_committed_result_is_pinned_by_its_sweep_file_to_the_kernels_it_was_trained_with():
    sweeps = {}
    for path in sorted((ROOT / "sweeps").rglob("*.toml")):
        spec = tomllib.loads(path.read_text())
        sweeps[spec["name"]] = spec.get("train", {})
    checked = 0
    for runs_file in sorted((ROOT / "results").glob("*/runs.parquet")):
        runs = pd.read_parquet(runs_file, columns=["sweep", "config"])
        for name, config in runs.groupby("sweep")["config"].first().items():
            if name not in sweeps:
                continue  # results of a command, not of a sweep file (e.g. precision-tax)
            stored = from_stored(json.loads(config))
            rerun = from_dict({**RunConfig().to_dict(), **sweeps[name]})
            # cpu_gemm as it resolves: a record stores the library that multiplied, a sweep file may say "auto"
            assert (rerun.adamw, rerun.head_chunk, gemm.for_run(rerun)) == (stored.adamw, stored.head_chunk,
                                                                           gemm.for_run(stored)), \
                f"sweeps for {name} must set adamw = {stored.adamw!r}, head_chunk = {stored.head_chunk} and " \
                f"cpu_gemm = {stored.cpu_gemm!r}"
            checked += 1
    assert checked >= 5  # cpu-repro, cpu-lambda, cpu-long and the regime searches


@pytest.mark.parametrize("kernel, fused", [("fused", True), ("foreach", False)])
def test_adamw_runs_the_kernel_the_config_names_also_after_resuming(kernel, fused):
    cfg = tiny_config(adamw=kernel, device="cpu")
    module = SingleModule(cfg)
    assert all(g["fused"] is fused for g in module.opt.param_groups)
    other = SingleModule(cfg.replace(adamw="foreach" if fused else "fused"))
    other.train_batch(*_batch(cfg), [1e-3], stats=False)
    module.load_state_dict(other.state_dict())  # a checkpoint written with the other kernel
    assert all(g["fused"] is fused and g["foreach"] is (None if fused else True) for g in module.opt.param_groups)


def test_fused_and_foreach_adamw_train_the_same_run_up_to_rounding():
    losses = {}
    for kernel in ("fused", "foreach"):
        cfg = tiny_config(adamw=kernel, device="cpu", precision="fp32")
        module = SingleModule(cfg)
        x, y = _batch(cfg)
        losses[kernel] = [float(module.train_batch(x, y, [3e-3], stats=False)[0][0, 0]) for _ in range(20)]
    assert losses["fused"][-1] < losses["fused"][0] - 0.1  # it trains
    assert losses["fused"] == pytest.approx(losses["foreach"], rel=1e-4)


def _batch(cfg):
    g = torch.Generator().manual_seed(0)
    shape = (cfg.batch_size, cfg.seq_len)
    return torch.randint(0, cfg.vocab_size, shape, generator=g), torch.randint(0, cfg.vocab_size, shape, generator=g)


@pytest.mark.parametrize("chunk", [3, 1024])
def test_a_target_whose_probability_underflows_keeps_a_finite_exact_loss(chunk):
    """A diverging run's logits: the target sits 150 nats below the row's top logit, so its fp32
    softmax probability is 0 (below ``P_TARGET_FLOOR``); its cross-entropy and log Z still equal
    float64's, and the ordinary tokens beside it are unchanged."""
    torch.manual_seed(0)
    N, H, V = 8, 4, 64
    h = torch.randn(N, H, dtype=torch.float64)
    E = torch.randn(V, H, dtype=torch.float64)
    y = torch.randint(0, V, (N,))
    E[y[0]] = -150 * h[0] / h[0].norm() ** 2  # l[y0] = E[y0]·h0 = -150
    logits = h @ E.T
    assert math.exp(float(logits[0, y[0]] - logits[0].logsumexp(0))) < P_TARGET_FLOOR
    _, ce64, _, lse64, _ = chunked_head(h, E, y, chunk=chunk)
    _, ce32, _, lse32, _ = chunked_head(h.float(), E.float(), y, chunk=chunk)
    assert torch.isfinite(lse32).all() and math.isfinite(float(ce32))
    torch.testing.assert_close(lse64, logits.logsumexp(-1))  # float64's head is exact too (its rows below the floor)
    assert float(ce64) == pytest.approx(float(torch.nn.functional.cross_entropy(logits, y)), rel=1e-12)
    torch.testing.assert_close(lse32.double(), lse64, rtol=1e-6, atol=1e-5)
    assert float(ce32) == pytest.approx(float(ce64), rel=1e-6)
    assert float(ce64) > 150 / N  # the token's loss counts in full


@pytest.mark.parametrize("scale, max_norm", [(10.0, 1.0), (1e-3, 1.0), (1.0, math.inf), (math.nan, 1.0)],
                         ids=["clips", "below-the-clip", "no-clip", "nan-gradient"])
def test_clipping_gives_torchs_bits_and_skips_the_scaling_only_where_it_is_by_one(scale, max_norm):
    """``clip_grad_norm`` returns torch's norm and leaves torch's gradients; where min(1, max/(norm+1e-6))
    is exactly 1 it does not touch them (a scaling by 1 changes no bit), else it scales them (NaN too)."""
    from bench.train_module import clip_grad_norm
    torch.manual_seed(0)
    grads = [torch.randn(7, 5) * scale, torch.randn(5) * scale]
    ours = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    ref = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, q, g in zip(ours, ref, grads):
        p.grad, q.grad = g.clone(), g.clone()
    versions = [p.grad._version for p in ours]
    norm = clip_grad_norm(ours, max_norm)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm, foreach=True)
    assert torch.equal(norm, ref_norm) or (norm.isnan() and ref_norm.isnan())
    for p, q in zip(ours, ref):
        assert torch.equal(p.grad, q.grad) or (p.grad.isnan().all() and q.grad.isnan().all())
    scaled = [p.grad._version != v for p, v in zip(ours, versions)]
    assert scaled == [scale == 10.0 or math.isnan(scale)] * 2


def test_a_packs_clipping_skips_the_scaling_only_where_every_member_is_below_its_clip():
    from bench.pack.optim import PackedAdamW
    from bench.pack.store import FlatParams

    class _M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(6, 5))

    store = FlatParams.from_models([_M(), _M()])
    opt = PackedAdamW(store, betas=[(0.9, 0.95)] * 2, eps=[1e-8] * 2, weight_decay=[0.0] * 2, grad_clip=[1.0, 1.0])
    for big, expect_scaled in ((1e-3, False), (10.0, True)):
        store.grad.copy_(torch.randn_like(store.grad) * torch.tensor([[1e-3], [big]]))
        before, version = store.grad.clone(), store.grad._version
        norms = opt.clip_grad_norm_()
        assert (store.grad._version != version) is expect_scaled
        coef = torch.clamp(1.0 / (norms + 1e-6), max=1.0)
        assert torch.equal(store.grad, before * coef.unsqueeze(1))
