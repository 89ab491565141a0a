"""The memory estimate (bench.memory) against memory measured on this CPU at small sizes.

``estimate_step_bytes`` counts the weights and AdamW state (resident before a step) plus what the
step allocates: gradients, activations, the loss head. ``measure_peak_bytes`` sees only what a step
allocates above what the process held (on CPU: PyTorch's allocator, through the profiler), so the
comparison is against the estimate minus the resident part (weights and the two AdamW moments,
3·P·4 bytes). Measured: 0.59–1.17× of it (`micro` unchunked 55.1 MiB measured vs 60.8 estimated,
soft-capping 71.1 vs 60.8; chunked 19.4 vs 32.9 with and without soft-capping, whose cap the fp32 oneDNN head
takes into its own passes, and whose softmax writes in place, where the estimate counts a second buffer; `tiny`
151.4 vs 173.0 and 72.2 vs 101.5; evaluation 64.3 vs 72.0 and 16.3 vs 24.0; in bf16-emu and bf16 chunked
0.67–0.94×; session 19).
"""
import pytest
import torch

from bench.config import RunConfig
from bench.memory import estimate_eval_bytes, estimate_step_bytes, measure_peak_bytes
from bench.model import count_params

SIZES = [("micro", 8192, 64, 8), ("tiny", 8192, 128, 8)]


@pytest.fixture(autouse=True)
def _measurable():
    if measure_peak_bytes(lambda: None) is None:
        pytest.skip("peak memory needs the profiler's allocation events or /proc/self (Linux)")


def test_the_measured_peak_is_the_most_tensor_memory_live_at_once():
    """4 MiB and 8 MiB live together, then 2 MiB alone: the peak is 12 MiB, on every call, whatever
    the process's heap held before (the resident set could not promise either)."""
    def fn():
        a, b = torch.ones(2**20), torch.ones(2**21)  # float32: 4 and 8 MiB
        del a, b
        torch.ones(2**19)

    big = torch.ones(2**24)  # 64 MiB allocated and freed before: the heap has room to reuse
    del big
    assert [measure_peak_bytes(fn) for _ in range(3)] == [12 * 2**20] * 3
    assert measure_peak_bytes(lambda: None) == 0


@pytest.mark.parametrize("stabilizer", ["baseline", "softcap"])
@pytest.mark.parametrize("chunk", [0, 256], ids=["unchunked", "chunked"])
@pytest.mark.parametrize("model,V,T,B", SIZES, ids=[s[0] for s in SIZES])
def test_the_step_estimate_matches_the_measured_allocation(model, V, T, B, chunk, stabilizer):
    from bench.train_module import SingleModule

    cfg = RunConfig(model=model, vocab_size=V, seq_len=T, batch_size=B, precision="fp32", device="cpu", threads=1,
                    head_chunk=chunk, stabilizer=stabilizer)
    m = SingleModule(cfg)
    x = torch.randint(0, V, (B, T))
    for _ in range(3):  # AdamW's moments exist after the first step; later steps allocate the same
        m.train_batch(x, x, [1e-3], False)
    measured = measure_peak_bytes(lambda: m.train_batch(x, x, [1e-3], False))
    allocated = estimate_step_bytes(cfg) - 3 * count_params(cfg.model_config()) * 4
    assert 0.5 * allocated <= measured <= 2 * allocated, (measured / 2**20, allocated / 2**20)


@pytest.mark.parametrize("chunk", [0, 256], ids=["unchunked", "chunked"])
def test_the_evaluation_estimate_matches_the_measured_allocation(chunk):
    from bench.model import GPT
    from bench.stabilizers import make_stabilizer
    from bench.trainer import evaluate

    cfg = RunConfig(model="micro", vocab_size=8192, seq_len=128, batch_size=8, precision="fp32", head_chunk=chunk)
    model = GPT(cfg.model_config())
    x = torch.randint(0, 8192, (8, 128))
    args = (model, make_stabilizer("baseline"), [(x, x)], torch.device("cpu"), torch.autocast("cpu", enabled=False))
    evaluate(*args, chunk=chunk)
    measured = measure_peak_bytes(lambda: evaluate(*args, chunk=chunk))
    allocated = estimate_eval_bytes(cfg) - count_params(cfg.model_config()) * 4  # the weights are resident
    assert 0.3 * allocated <= measured <= 2 * allocated, (measured / 2**20, allocated / 2**20)


def test_the_estimate_counts_auto_precision_as_the_run_resolves_it():
    """Precision "auto" trains in bf16 on CUDA: its estimate is bf16's, not fp32's (an H200 `stabench perf` at
    221M once printed 62.2 GiB estimated for a step that allocated 23.8 GiB)."""
    cuda = RunConfig(model="micro", vocab_size=8192, seq_len=256, batch_size=8, precision="auto", device="cuda")
    assert estimate_step_bytes(cuda) == estimate_step_bytes(cuda.replace(precision="bf16"))
    assert estimate_step_bytes(cuda) < estimate_step_bytes(cuda.replace(precision="fp32"))
    assert estimate_eval_bytes(cuda) == estimate_eval_bytes(cuda.replace(precision="bf16"))
    here = RunConfig(model="micro", precision="auto", device="cpu")
    assert estimate_step_bytes(here) == estimate_step_bytes(here.replace(precision=here.resolved_precision))


def test_a_soft_capped_chunked_step_is_estimated_without_building_the_kernel(monkeypatch):
    """Where the head takes the cap into its own passes (fp32, oneDNN's products) soft-capping holds no buffers
    of its own; the estimate says so without compiling anything (it runs when a config is checked). Through its
    own hooks (ATen's products) it holds two more chunks."""
    from bench import native

    monkeypatch.setattr(native, "build", lambda: pytest.fail("the estimate built the kernel"))
    native.capped_kernel.cache_clear()
    try:
        kw = dict(model="micro", vocab_size=8192, seq_len=64, batch_size=8, precision="fp32", head_chunk=256)
        for gemm, extra_chunks in (("onednn", 0), ("aten", 2)):
            capped, base = (RunConfig(**kw, cpu_gemm=gemm, stabilizer=s) for s in ("softcap", "baseline"))
            assert estimate_step_bytes(capped) - estimate_step_bytes(base) == extra_chunks * 256 * 8192 * 4, gemm
    finally:
        native.capped_kernel.cache_clear()
