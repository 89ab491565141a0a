"""The memory estimate (bench.memory) against memory measured on this CPU at small sizes.

``estimate_step_bytes`` counts the weights and AdamW state (resident before a step) plus what the
step allocates: gradients, activations, the loss head. ``measure_peak_bytes`` sees only what a step
allocates above what the process held, so the comparison is against the estimate minus the
resident part (weights and the two AdamW moments, 3·P·4 bytes). Measured: within 0.7–1.3× of it for
both heads (e.g. `micro` unchunked 76 MiB measured vs 61 estimated, chunked 33 vs 47).
"""
import pytest
import torch

from bench.config import RunConfig
from bench.memory import estimate_eval_bytes, estimate_step_bytes, measure_peak_bytes
from bench.model import count_params

SIZES = [("micro", 8192, 64, 8), ("tiny", 8192, 128, 8)]


@pytest.fixture(autouse=True)
def _linux():
    if measure_peak_bytes(lambda: None) is None:
        pytest.skip("peak memory is measured through /proc/self (Linux only)")


@pytest.mark.parametrize("chunk", [0, 256], ids=["unchunked", "chunked"])
@pytest.mark.parametrize("model,V,T,B", SIZES, ids=[s[0] for s in SIZES])
def test_the_step_estimate_matches_the_measured_allocation(model, V, T, B, chunk):
    from bench.train_module import SingleModule

    cfg = RunConfig(model=model, vocab_size=V, seq_len=T, batch_size=B, precision="fp32", device="cpu", threads=1,
                    head_chunk=chunk)
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
