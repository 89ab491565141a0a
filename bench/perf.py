"""``stabench perf``: how fast stabench trains on this machine, as ratios measured in one run.

- peak: dense GEMM FLOP/s of the device in the step's dtype, with the threads stabench uses;
- per preset: steady-state step time (median, p10, p90), tokens/s, FLOPs per token
  (6·N + 12·L·H·T), achieved FLOP/s and MFU = achieved / measured peak;
- per stabilizer: step-time overhead vs baseline, measured interleaved in this process (with an
  A/A control), and the cost of its hooks timed alone;
- sweep layouts: trials/hour of short trials with 1 worker × all cores and 1 worker per core,
  unpacked and packed (the same measurement serves the sweep engine's default layout and the
  packed-vs-unpacked factor, with its ceiling at the measured GEMM peak).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from typing import Any

import torch

from . import gemm, provenance, runtime
from .config import RunConfig, from_dict, machine_device
from .model import flops_per_token
from .precision import resolve_precision
from .stabilizers import BUILTIN

QUICK = dict(steps=4, warmup_steps=2, rounds=2, overhead_steps=3, layout_steps=10, head_tokens=512)
FULL = dict(steps=24, warmup_steps=5, rounds=12, overhead_steps=8, layout_steps=150, head_tokens=16384)
HEAD_PRESET = ("16M", 50304)
"""The loss head's memory is measured at the study's smallest model and vocabulary (H = 224):
B·T = ``head_tokens`` tokens (16,384 = 64 × 256 in a full run)."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device: torch.device, reps: int, warmup: int = 2, after=None) -> float:
    """Median wall seconds of ``fn()`` over ``reps`` timed calls after ``warmup`` untimed ones,
    the device synchronized around each; ``after()`` (untimed) runs after every call."""
    times = []
    for i in range(warmup + reps):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t)
        if after is not None:
            after()
    return statistics.median(times)


def gemm_peak(dtype: torch.dtype, device: torch.device, sizes=None, reps: int = 5,
              library: str = "aten") -> dict[str, Any]:
    """Best dense matmul FLOP/s over square sizes (median of ``reps`` timings per size), the products in
    ``library`` ("aten", "onednn": ``bench.gemm``, the run's: its MFU is against the peak of its own kernels).

    CPU: one matmul per timing, sizes 512–2048. CUDA: sizes 4096–16384 and 10 back-to-back matmuls
    between two CUDA events per timing, so kernel launches and host syncs do not count (timing one
    small matmul between syncs measures launch overhead: a peak too low, an MFU too high)."""
    cuda = device.type == "cuda"
    sizes = sizes or ((4096, 8192, 16384) if cuda else (512, 1024, 2048))
    best, at = 0.0, 0
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        if cuda:
            secs = _event_seconds(lambda: a @ b, inner=10, reps=reps)
        else:
            secs = median_seconds(lambda: gemm.mm(a, b, library), device, reps)
        flops = 2 * n**3 / secs
        if flops > best:
            best, at = flops, n
    used = library if gemm.onednn_takes(a, b) else "aten"
    return {"dtype": str(dtype).removeprefix("torch."), "flops": best, "size": at, "library": used,
            "method": "CUDA events over 10 back-to-back matmuls" if cuda else "wall clock per matmul"}


def _event_seconds(fn, inner: int, reps: int) -> float:
    """Median seconds of one ``fn()`` on CUDA: ``inner`` calls between two events, ``reps`` times."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / inner)
    return statistics.median(times)


class StepTimer:
    """One model set up exactly as the trainer does (its training module), stepping on fixed batches."""

    def __init__(self, cfg: RunConfig, data):
        from .train_module import SingleModule

        self.cfg, self.s = cfg, SingleModule(cfg)
        self.batches = [tuple(t.to(self.s.device) for t in data.train_batch(i, 0, cfg.batch_size, cfg.seq_len))
                        for i in range(4)]
        self.i = 0

    def run(self, n: int) -> list[float]:
        from .trainer import lr_at

        times = []
        for _ in range(n):
            x, y = self.batches[self.i % len(self.batches)]
            _sync(self.s.device)
            t = time.perf_counter()
            self.s.train_batch(x, y, [lr_at(self.cfg, self.cfg.warmup + self.i)], stats=False)  # full lr
            _sync(self.s.device)
            times.append(time.perf_counter() - t)
            self.i += 1
        return times


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(int(q * len(xs)), len(xs) - 1)]


def previous_path(cfg: RunConfig) -> dict[str, Any]:
    """The settings of the training step before the chunked head, CPU-fused AdamW and oneDNN's products (the
    kernels the committed CPU results were trained with): the unchunked head, and on CPU AdamW's foreach
    path and ATen's products (CUDA runs had the fused kernel already)."""
    if machine_device(cfg.device) == "cuda":
        return {"head_chunk": 0}
    return {"head_chunk": 0, "adamw": "foreach", "cpu_gemm": "aten"}


def preset_row(cfg: RunConfig, data, steps: int, warmup_steps: int, peak: float, rounds: int = 3,
               compare: bool = True) -> dict[str, Any]:
    """Step time of ``cfg`` (its head_chunk) and of the previous path (``previous_path``: the unchunked
    head, and on CPU AdamW's foreach path) interleaved in ``rounds`` rounds, the first step's time
    (compile included when compiled), and the peak memory of one step of each, measured and estimated.
    The ``*_unchunked`` fields are the previous path's; None with ``compare=False`` (``cfg`` alone:
    a compiled row spares the previous path's compilation)."""
    from .memory import estimate_step_bytes, measure_peak_bytes

    t0 = time.perf_counter()
    timer = StepTimer(cfg, data)
    first = timer.run(1)[0]
    setup = time.perf_counter() - t0 - first
    before = previous_path(cfg)
    prev = cfg.replace(**before)
    old = StepTimer(prev, data) if compare and prev != cfg else None
    for t in (timer, old):
        if t is not None:
            t.run(warmup_steps)
    times, times_old, ratios = [], [], []
    per_round = max(1, steps // rounds)
    for _ in range(rounds):
        a = timer.run(per_round)
        times += a
        if old is not None:
            b = old.run(per_round)
            times_old += b
            ratios.append(statistics.median(b) / statistics.median(a))
    step = statistics.median(times)
    tokens = cfg.batch_size * cfg.seq_len
    fpt = flops_per_token(cfg.model_config())
    achieved = fpt * tokens / step
    peak_mem = measure_peak_bytes(lambda: timer.run(1), timer.s.device)
    row = {"preset": cfg.model, "n_params": timer.s.model.n_params, "vocab_size": cfg.vocab_size,
           "batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "tokens_per_step": tokens,
           "precision": timer.s.precision, "head_chunk": cfg.head_chunk, "compile": cfg.compile,
           "step_time_s": step, "step_time_p10_s": _quantile(times, 0.1),
           "step_time_p90_s": _quantile(times, 0.9), "tokens_per_s": tokens / step,
           "flops_per_token": fpt, "achieved_flops": achieved, "peak_flops": peak, "mfu": achieved / peak,
           "first_step_s": first, "setup_s": setup, "compile_s": max(first - step, 0.0) if cfg.compile else None,
           "peak_memory_bytes": peak_mem, "estimated_memory_bytes": estimate_step_bytes(cfg),
           "step_time_unchunked_s": statistics.median(times_old) if times_old else step,
           "unchunked_over_chunked": statistics.median(ratios) if ratios else 1.0, "previous_path": before}
    if old is not None:
        row["peak_memory_unchunked_bytes"] = measure_peak_bytes(lambda: old.run(1), old.s.device)
        row["estimated_memory_unchunked_bytes"] = estimate_step_bytes(prev)
    elif not compare:
        row.update(step_time_unchunked_s=None, unchunked_over_chunked=None, peak_memory_unchunked_bytes=None,
                   estimated_memory_unchunked_bytes=None, previous_path=None)
    else:
        row["peak_memory_unchunked_bytes"], row["estimated_memory_unchunked_bytes"] = peak_mem, row["estimated_memory_bytes"]
    return row


def head_memory_apart(n_tokens: int, width: int, vocab: int, chunk: int, device: torch.device
                      ) -> dict[str, Any] | None:
    """``head_memory`` — on CPU in a fresh process with glibc's default heap and this process's threads, on
    CUDA here. The unchunked head at 16M holds ~10 GiB; the heap ``runtime.tune_allocator`` set up for this
    process's training steps keeps what it once touched and fragments around such blocks (its resident set
    outgrew a 24 GiB machine while the live tensors peaked at 9 GiB). None when the child ends without a
    result."""
    if device.type != "cpu":
        return head_memory(n_tokens, width, vocab, chunk, device)
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        try:
            return pool.submit(_head_memory_child, n_tokens, width, vocab, chunk, torch.get_num_threads()).result()
        except BrokenProcessPool:
            return None


def _head_memory_child(n_tokens: int, width: int, vocab: int, chunk: int, threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    return head_memory(n_tokens, width, vocab, chunk, torch.device("cpu"))


def head_memory(n_tokens: int, width: int, vocab: int, chunk: int, device: torch.device, reps: int = 2
                ) -> dict[str, Any]:
    """The loss head alone (h (n_tokens × width) → logits over ``vocab`` → cross-entropy, forward and
    backward into h and E), unchunked (``F.linear`` + the fused cross-entropy, the path of
    ``head_chunk = 0``) and in chunks of ``chunk`` tokens: peak memory (``measure_peak_bytes``) and
    median seconds, each measured in this process."""
    from .head import chunked_head
    from .losses import cross_entropy_lse
    from .memory import measure_peak_bytes

    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(n_tokens, width, device=device, generator=g).requires_grad_()
    E = (0.02 * torch.randn(vocab, width, device=device, generator=g)).requires_grad_()
    y = torch.randint(0, vocab, (n_tokens,), device=device, generator=g)

    def full() -> None:
        ce, _ = cross_entropy_lse(torch.nn.functional.linear(h, E), y)
        ce.mean().backward()

    def part() -> None:
        chunked_head(h, E, y, chunk=chunk, stats=False)[0].backward()

    def drop() -> None:
        h.grad = E.grad = None

    out: dict[str, Any] = {"tokens": n_tokens, "width": width, "vocab_size": vocab, "chunk": chunk}
    for name, fn in (("unchunked", full), ("chunked", part)):
        out[f"{name}_peak_bytes"] = measure_peak_bytes(lambda: (fn(), drop()), device)
        out[f"{name}_s"] = median_seconds(fn, device, reps, warmup=1, after=drop)
    if out["chunked_peak_bytes"] and out["unchunked_peak_bytes"]:
        out["memory_ratio"] = out["chunked_peak_bytes"] / out["unchunked_peak_bytes"]
    out["time_ratio"] = out["chunked_s"] / out["unchunked_s"]
    return out


HOOK_REPS = 5
"""Repetitions of a stabilizer's hooks (and of soft-capping's floor) per round of ``stabilizer_overhead``."""

AA_CONTROL = "baseline (A/A)"
"""A second, independently built baseline timed like the stabilizers: its "overhead" is the
resolution of the whole-step comparison on this machine (it would be 0 on a quiet one)."""


def stabilizer_overhead(base: RunConfig, data, rounds: int, steps: int, warmup_steps: int) -> list[dict[str, Any]]:
    """Median step time per stabilizer on ``base.model`` and its overhead vs baseline, two ways.

    Whole step: rounds are interleaved (every stabilizer runs ``steps`` steps per round, in
    turn) and ``overhead`` is the median over rounds of (median step this round / baseline's
    median step this round) − 1, so slow drifts of a shared machine cancel within each round;
    the A/A control row shows how far two identical baselines still differ.
    Hooks alone: ``hook_s`` is the time of the stabilizer's own work (its hooks' forward and
    backward, see ``hook_time``) and ``hook_overhead`` = hook_s / baseline step, which resolves
    costs well below the whole-step noise. The hooks, and the floor of soft-capping, are timed in
    every round too (``HOOK_REPS`` repetitions after the round's steps) and ``hook_s`` / ``floor_s``
    are the medians over rounds (``hook_round_s``, ``floor_round_s``): timed once, after all rounds,
    the same soft-capping hooks read 3.9 and 6.1 ms in one process on a 2-core EPYC.
    """
    hp = {"zloss": {"lam": 1e-4}, "muloss": {"lam": 1e-4}, "softcap": {"cap": 30.0}}
    timers = {name: StepTimer(base.replace(stabilizer=name, hparams=hp.get(name, {})), data) for name in BUILTIN}
    timers[AA_CONTROL] = StepTimer(base.replace(stabilizer="baseline"), data)
    for t in timers.values():
        t.run(warmup_steps)
    samples: dict[str, list[float]] = {name: [] for name in timers}
    ratios: dict[str, list[float]] = {name: [] for name in timers}
    hooks: dict[str, list[float]] = {name: [] for name in timers}
    floors: list[float] = []
    device = timers["baseline"].s.device
    for _ in range(rounds):
        block = {name: statistics.median(t.run(steps)) for name, t in timers.items()}
        for name, v in block.items():
            samples[name].append(v)
            ratios[name].append(v / block["baseline"])
        for name, t in timers.items():
            hooks[name].append(hook_time(t.s, t.batches[0][1], reps=HOOK_REPS))
        floors.append(softcap_floor(base, device, reps=HOOK_REPS))
    med = {name: statistics.median(v) for name, v in samples.items()}
    rows = []
    for name in timers:
        hook = statistics.median(hooks[name])
        rows.append({"preset": base.model, "stabilizer": name, "step_time_s": med[name], "round_ratios": ratios[name],
                     "overhead": statistics.median(ratios[name]) - 1,
                     "hook_s": hook, "hook_round_s": hooks[name], "hook_overhead": hook / med["baseline"],
                     "hook_in_head": head_cap(timers[name].s) is not None,
                     "head_capping": head_capping(timers[name].s)})
    floor = statistics.median(floors)
    rows[list(timers).index("softcap")].update(floor_s=floor, floor_round_s=floors,
                                               floor_overhead=floor / med["baseline"])
    return rows


def hook_time(s, y: torch.Tensor, reps: int = 20) -> float:
    """Median seconds of one step's stabilizer work, timed alone on the module ``s`` with targets y (B, T):
    ``transform_logits`` forward + backward on (B, T, V) logits — as the trainer's head runs it: through
    ``transform_logits_with_slope`` and one multiplication of the logit gradient by the slope where the
    chunked head serves the stabilizer and it gives one, else through autograd —, ``token_loss`` and
    ``loss_term`` forward + backward (its inputs as the trainer builds them; gradients land in throwaway
    tensors, E's added to a gradient already there, as the head's is in training; where the chunked head runs
    it through ``loss_term_with_grad``: that hook and the addition of its gradient, scaled, to E's) and the
    run's ``AfterStep`` (built once, as the trainer builds it) on the model. Hooks a stabilizer does not
    override cost 0, as in the trainer. Where the head takes the transform into its logit GEMM
    (``logit_cap`` under oneDNN: no pass of the transform's own to time), the transform's share is what it
    adds to the head (``capped_head_time``)."""
    from .stabilizers import LossInputs
    from .train_module import AfterStep, term_with_grad, transform_with_slope, uses_chunked_head

    stab, model, dev = s.stab, s.model, s.device
    has = {h: type(stab).has_hook(h) for h in ("transform_logits", "token_loss", "loss_term", "after_step")}
    if not any(has.values()):
        return 0.0
    B, T = y.shape
    logits = torch.randn(B, T, model.cfg.vocab_size, device=dev, requires_grad=True)
    g = torch.randn_like(logits)
    lse = torch.randn(B, T, device=dev, requires_grad=True)
    hidden = torch.randn(B, T, model.cfg.n_embd, device=dev, requires_grad=True)
    E = model.output_embedding.detach().clone().requires_grad_()
    E.grad = torch.zeros_like(E)  # the head's ∂E, there before the term's, as in training: the term's is added to it
    chunked = uses_chunked_head(stab, s.chunk)
    cap = head_cap(s)
    in_head = capped_head_time(s, y, cap, reps) if cap is not None else 0.0
    if cap is not None:
        has["transform_logits"] = False  # timed inside the head just now
    with_slope = transform_with_slope(stab) if chunked and cap is None else None
    e_term = term_with_grad(stab) if chunked else None
    one = torch.ones((), device=dev)  # the head's incoming gradient
    g_out = torch.empty_like(g) if with_slope is not None else None
    after = AfterStep(model, stab) if has["after_step"] else None  # built once, as the trainer's

    def hooks() -> None:
        out = logits
        if with_slope is not None:
            out, slope = with_slope(logits.detach())
            torch.mul(g, slope, out=g_out)  # the head's g.mul_(f′) on its own buffer
        elif has["transform_logits"]:
            out = stab.transform_logits(logits)
            out.backward(g)
        if has["token_loss"]:
            stab.token_loss(lse).mean().backward()
        if e_term is not None:  # as the head runs it: the hook, then its gradient times the incoming one into E's
            _, grad = e_term(E.detach())
            E.grad.add_(grad * one)
        elif has["loss_term"]:
            reg = stab.loss_term(LossInputs(out.detach().requires_grad_(), lse, hidden, E))
            if reg is not None:
                reg.backward()
        if after is not None:
            after()

    def drop_grads() -> None:
        logits.grad = lse.grad = hidden.grad = None

    if not any(has.values()):
        return in_head
    return in_head + median_seconds(hooks, dev, reps, after=drop_grads)


def head_cap(s) -> float | None:
    """The cap module ``s``'s chunked head takes into its logit GEMM (``logit_cap``, fp32 products in
    oneDNN: ``bench.head``), or None where its transform, if any, runs through its own hooks."""
    from .head import fuses_cap
    from .train_module import logit_cap, uses_chunked_head

    lib = getattr(s.model, "gemm_library", "aten")
    if not (uses_chunked_head(s.stab, s.chunk) and fuses_cap(s.precision, s.device, lib)):
        return None
    return logit_cap(s.stab)


def head_capping(s) -> str | None:
    """How module ``s``'s chunked head caps its logits where it takes the cap itself (``head_cap``): "kernel"
    (stabench's compiled kernel, ``bench.native``) or "epilogue" (σ from oneDNN's logit GEMM); else None."""
    from .native import capped_kernel

    if head_cap(s) is None:
        return None
    return "kernel" if capped_kernel() is not None else "epilogue"


def capped_head_time(s, y: torch.Tensor, cap: float, reps: int = 20) -> float:
    """Seconds that soft-capping at ``cap`` adds to the chunked head of module ``s`` (its width, vocabulary,
    chunk and library) for targets y (B, T), forward + backward: the median of the head with the cap
    (``bench.head``'s capped chunks) minus the median of the head without a transform, on the same inputs."""
    from .head import chunked_head

    model, dev = s.model, s.device
    n = y.numel()
    h = torch.randn(n, model.cfg.n_embd, device=dev, requires_grad=True)
    E = model.output_embedding.detach().clone().requires_grad_()
    yf = y.reshape(-1)
    lib = getattr(model, "gemm_library", "aten")

    def head(capped: bool):
        def run() -> None:
            kw = {"transform": s.stab.transform_logits, "cap": cap} if capped else {}
            chunked_head(h, E, yf, chunk=s.chunk, stats=False, gemm=lib, **kw)[0].backward()
        return run

    def drop_grads() -> None:
        h.grad = E.grad = None

    return (median_seconds(head(True), dev, reps, after=drop_grads)
            - median_seconds(head(False), dev, reps, after=drop_grads))


def softmax_floor(cfg: RunConfig, device: torch.device, reps: int = 20) -> float:
    """Seconds of the least work a softmax cross-entropy does per step: one exp pass over the
    (batch·seq, V) float32 logits into a fresh buffer and one in-place pass over the result (the
    backward's probabilities times the incoming gradient), median of ``reps``, with this process's threads."""
    x = torch.randn(cfg.batch_size * cfg.seq_len, cfg.vocab_size, device=device)
    return median_seconds(lambda: torch.exp(x).mul_(0.5), device, reps)


def softcap_floor(cfg: RunConfig, device: torch.device, reps: int = 20) -> float:
    """Seconds of the least work soft-capping adds to a step as separate passes: one transcendental pass
    forward (ATen's sigmoid, its cheapest on CPU) and one fused pass backward (tanh_backward) over the
    (batch·seq, V) float32 logits, each into a fresh buffer as autograd does, median of ``reps``. A head
    that takes the sigmoid into its GEMM and writes in place (``bench.head``'s capped chunks) can go below it."""
    x = torch.randn(cfg.batch_size * cfg.seq_len, cfg.vocab_size, device=device)
    g = torch.randn_like(x)
    return median_seconds(lambda: torch.ops.aten.tanh_backward(g, torch.sigmoid(x)), device, reps)


PACK_K = 4  # members per pack in the comparison: one pack per worker in the C×1 layout


def packed_throughput(base: RunConfig, steps: int, cores: int, peak: float, packed: bool = True,
                      log=print) -> dict[str, Any]:
    """Trials/hour of ``base``'s preset packed (K = PACK_K) vs unpacked, all four layouts, one run
    (``packed=False``: the two unpacked layouts only).

    Every layout trains the same PACK_K × cores short trials (learning rates base.lr·(1 + i/10),
    one data seed) on fresh worker processes, warmed up before timing as sweep workers are.
    ``factor`` = best packed / best unpacked trials per hour.
    Each row also gets the training FLOP/s its trials achieved (6·N + attention per token, evaluation
    not counted, so a lower bound) and its MFU against ``peak``; ``ceiling`` = peak / the best
    unpacked layout's FLOP/s is the factor a pack would reach if it ran at the measured GEMM peak:
    no packing can beat it on this machine. ``ceiling_softmax`` is tighter: a pack that ran its
    matmuls at the GEMM peak and did nothing else but the least a softmax cross-entropy needs per
    member (``softmax_floor``: one exp pass over the logits and one pass over its result) would
    take steps × (FLOPs per step / peak + that floor) per trial; the factor is the best unpacked
    layout's seconds per trial over that.
    """
    from .pack.throughput import LAYOUTS, measure_pack_throughput, speedup

    layouts = LAYOUTS if packed else tuple(x for x in LAYOUTS if x.startswith("unpacked"))
    rows = measure_pack_throughput(base, PACK_K, steps, n_trials=PACK_K * cores, cores=cores, layouts=layouts,
                                   log=log)
    flops_per_trial = steps * base.batch_size * base.seq_len * flops_per_token(base.model_config())
    for r in rows:
        r["achieved_flops"] = r["trials"] * flops_per_trial / r["wall_s"]
        r["mfu"] = r["achieved_flops"] / peak
    s = speedup(rows)
    floor = softmax_floor(base, torch.device(base.device))
    best_trial_s = 3600 / s["best_unpacked"]["trials_per_hour"]
    out = {"preset": base.model, "k": PACK_K, "trials": PACK_K * cores, "steps": steps, "rows": rows,
           "best_unpacked": s["best_unpacked"]["layout"], "ceiling": peak / s["best_unpacked"]["achieved_flops"],
           "softmax_floor_s": floor,
           "ceiling_softmax": best_trial_s / (flops_per_trial / peak + steps * floor)}
    if packed:
        out.update(best_packed=s["best_packed"]["layout"], factor=s["factor"])
    return out


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": provenance.cpu_model(),
            "cpu_count": os.cpu_count(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "cpu_native_bf16": provenance.cpu_supports_bf16(), "allocator_tuned": runtime.tune_allocator()}


def perf_config(model: str, *, device: str, precision: str, threads: int | None, batch_size: int, seq_len: int,
                vocab_size: int, compile_: bool, head_chunk: int | None = None) -> RunConfig:
    """The run ``stabench perf`` times for ``model`` (checked): synthetic tokens, lr 3e-3 after 10 warmup
    steps, the device's default ``head_chunk`` unless one is given."""
    return from_dict(dict(model=model, vocab_size=vocab_size, batch_size=batch_size, seq_len=seq_len, device=device,
                          precision=precision, threads=threads, compile=compile_, warmup=10, lr=3e-3,
                          data="synthetic:tokens=200000",
                          **({} if head_chunk is None else {"head_chunk": head_chunk}))).check()


def run_perf(presets: list[str], *, quick: bool, device: str, precision: str, threads: int | None,
             batch_size: int, seq_len: int, vocab_size: int | None, compile_: bool,
             sections: set[str], overhead_presets: list[str] | None = None, head_chunk: int | None = None,
             compare: bool = True, log=print) -> dict[str, Any]:
    from .data import load_data

    knobs = QUICK if quick else FULL
    dev = torch.device(machine_device(device))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = threads or (cores if dev.type == "cpu" else None)
    V = vocab_size or (50304 if dev.type == "cuda" else 8192)
    base = perf_config(presets[0], device=dev.type, precision=precision, threads=threads, batch_size=batch_size,
                       seq_len=seq_len, vocab_size=V, compile_=compile_, head_chunk=head_chunk)
    runtime.set_threads(threads)
    data = load_data(base.data, V)
    prec = resolve_precision(base.precision, dev)
    dtype = torch.bfloat16 if prec == "bf16" else (torch.float64 if prec == "fp64" else torch.float32)
    log(f"measuring {str(dtype).removeprefix('torch.')} GEMM peak on {provenance.device_name(dev)} "
        f"with {torch.get_num_threads()} threads…")
    library = gemm.for_run(base)
    peak = gemm_peak(dtype, dev, library=library)
    peaks = {peak["dtype"]: peak}
    if dev.type == "cpu" and dtype != torch.float32:
        fp32 = gemm_peak(torch.float32, dev, library=library)
        peaks[fp32["dtype"]] = fp32
    result: dict[str, Any] = {
        "created_at": provenance.utc_now(), "machine": machine(), "versions": provenance.versions(),
        "settings": {"device": dev.type, "precision": prec, "threads": torch.get_num_threads(), "quick": quick,
                     "cpu_gemm": library,
                     "batch_size": batch_size, "seq_len": seq_len, "vocab_size": V, "compile": compile_, "head_chunk": base.head_chunk, **knobs},
        "peak": peaks, "presets": [], "overhead": [], "layouts": [], "packed": [], "head": None}
    for name in presets:
        log(f"timing preset {name}…")
        row = preset_row(base.replace(model=name), data, knobs["steps"], knobs["warmup_steps"], peak["flops"],
                         compare=compare)
        result["presets"].append(row)
    if "head" in sections:
        from .presets import preset as model_preset
        name, vocab = HEAD_PRESET
        width = model_preset(name).n_embd
        log(f"measuring the loss head alone at {name} (H = {width}), V = {vocab}, {knobs['head_tokens']} tokens…")
        from .config import DEFAULT_HEAD_CHUNK
        chunk = base.head_chunk or DEFAULT_HEAD_CHUNK
        head = head_memory_apart(knobs["head_tokens"], width, vocab, chunk, dev)
        result["head"] = {"preset": name, **head} if head else None
        if head is None:
            log("the loss head alone could not be measured: its process ended without a result (out of memory?)")
    if "overhead" in sections:
        result["settings"]["overhead_presets"] = overhead_presets or presets[:1]
        for name in result["settings"]["overhead_presets"]:
            log(f"timing stabilizer overhead on {name} (interleaved)…")
            result["overhead"] += stabilizer_overhead(base.replace(model=name), data, knobs["rounds"],
                                                      knobs["overhead_steps"], knobs["warmup_steps"])
    if "layouts" in sections and dev.type == "cpu":
        micro = base.replace(model="micro" if "micro" in presets or not quick else presets[0], threads=None)
        log(f"timing sweep layouts on {micro.model}" + (", unpacked and packed…" if "packed" in sections else "…"))
        first = packed_throughput(micro, knobs["layout_steps"], cores, peak["flops"], packed="packed" in sections,
                                  log=log)
        # the sweep layouts are the unpacked rows: one measurement serves both comparisons
        result["layouts"] = [{**r, "layout": r["layout"].removeprefix("unpacked ")} for r in first["rows"]
                             if r["layout"].startswith("unpacked")]
        from .sweep.local import THREADS_PER_WORKER

        default = (max(1, cores // THREADS_PER_WORKER), min(THREADS_PER_WORKER, cores))
        best = max(result["layouts"], key=lambda r: r["trials_per_hour"])
        row = next((r for r in result["layouts"] if (r["workers"], r["threads"]) == default), None)
        result["default_layout"] = {
            "workers": default[0], "threads": default[1], "best": best["layout"],
            "default_vs_best": row["trials_per_hour"] / best["trials_per_hour"] if row else None}
        if "packed" in sections:
            result["packed"].append(first)
            if "nano" in presets and micro.model != "nano" and not quick:
                log("timing packed vs unpacked trials of nano…")
                result["packed"].append(packed_throughput(micro.replace(model="nano"), knobs["layout_steps"], cores,
                                                          peak["flops"], log=log))
    return result


def format_table(result: dict[str, Any]) -> str:
    peak = next(iter(result["peak"].values()))
    out = [f"GEMM peak ({peak['dtype']}, {peak.get('library', 'aten')}, {result['settings']['threads']} threads): {peak['flops'] / 1e9:.1f} GFLOP/s",
           "", f"{'preset':8} {'params':>10} {'prec':>5} {'step ms':>8} {'p10-p90 ms':>13} {'tokens/s':>10} "
               f"{'GFLOP/s':>8} {'MFU':>6}"]
    for r in result["presets"]:
        out.append(f"{r['preset']:8} {r['n_params']:>10,} {r['precision']:>5} {r['step_time_s'] * 1e3:>8.1f} "
                   f"{r['step_time_p10_s'] * 1e3:>6.1f}-{r['step_time_p90_s'] * 1e3:<6.1f} {r['tokens_per_s']:>10.0f} "
                   f"{r['achieved_flops'] / 1e9:>8.1f} {r['mfu']:>6.1%}")
    out += ["", "previous path: the unchunked head (head_chunk = 0), on CPU with AdamW's foreach path",
            f"{'preset':8} {'head_chunk':>10} {'previous ms':>13} {'speedup':>8} {'peak MiB':>9} "
            f"{'previous MiB':>14} {'estimate MiB':>13} {'compile s':>10}"]
    for r in result["presets"]:
        mem = lambda b: f"{b / 2**20:,.0f}" if b is not None else "n/a"  # noqa: E731
        comp = f"{r['compile_s']:.1f}" if r.get("compile_s") is not None else "-"
        out.append(f"{r['preset']:8} {r['head_chunk']:>10} {r['step_time_unchunked_s'] * 1e3:>13.1f} "
                   f"{r['unchunked_over_chunked']:>7.2f}x {mem(r['peak_memory_bytes']):>9} "
                   f"{mem(r['peak_memory_unchunked_bytes']):>14} {mem(r['estimated_memory_bytes']):>13} {comp:>10}")
    if result.get("head"):
        h = result["head"]
        out += ["", f"loss head alone ({h['preset']}, H = {h['width']}, V = {h['vocab_size']}, {h['tokens']} tokens): "
                    f"unchunked {h['unchunked_s'] * 1e3:.0f} ms, {(h['unchunked_peak_bytes'] or 0) / 2**20:,.0f} MiB; "
                    f"chunks of {h['chunk']}: {h['chunked_s'] * 1e3:.0f} ms, {(h['chunked_peak_bytes'] or 0) / 2**20:,.0f} MiB"]
    if result["overhead"]:
        out += ["", f"{'preset':8} {'stabilizer':14} {'step ms':>8} {'overhead':>9} {'hooks alone':>12}"]
        out += [f"{r.get('preset', ''):8} {r['stabilizer']:14} {r['step_time_s'] * 1e3:>8.2f} {r['overhead']:>+9.1%}"
                f" {r.get('hook_overhead', float('nan')):>+12.1%}"
                + (f"  (floor {r['floor_overhead']:+.1%})" if "floor_s" in r else "") for r in result["overhead"]]
    if result["layouts"]:
        out += ["", f"{'sweep layout':36} {'trials/hour':>12}"]
        out += [f"{r['layout']:36} {r['trials_per_hour']:>12.0f}" for r in result["layouts"]]
    d = result.get("default_layout")
    if d and d["default_vs_best"] is not None:
        out.append(f"sweep default ({d['workers']} worker(s) x {d['threads']} thread(s)): "
                   f"{d['default_vs_best']:.1%} of the best layout ({d['best']})")
    for p in result["packed"]:
        out += ["", f"{p['preset']}: {p['trials']} trials x {p['steps']} steps {'':6} {'trials/hour':>12}"]
        out += [f"{r['layout']:44} {r['trials_per_hour']:>12.0f}" for r in p["rows"]]
        out.append(f"best packed / best unpacked: {p['factor']:.2f}x (ceiling at the GEMM peak: {p['ceiling']:.2f}x, "
                   f"with the softmax's own passes: {p['ceiling_softmax']:.2f}x)")
    return "\n".join(out)


_LIBRARY = {"aten": "ATen's", "onednn": "oneDNN's"}


def format_markdown(result: dict[str, Any]) -> str:
    """The README's Performance tables from a ``stabench perf`` result."""
    st, m = result["settings"], result["machine"]
    peak = next(iter(result["peak"].values()))
    where = (f"{m['cuda']} (host: {m['cpu_count']} cores" if st["device"] == "cuda" and m.get("cuda")
             else f"{m['processor']} ({m['cpu_count']} cores, {st['threads']} threads")
    out = [f"Measured {result['created_at'][:10]} on {where}, {st['precision']}, batch {st['batch_size']} × seq {st['seq_len']}, "
           f"V = {st['vocab_size']}); GEMM peak {peak['flops'] / 1e9:.0f} GFLOP/s ({peak['dtype']}, {peak['size']}², "
           f"{_LIBRARY.get(peak.get('library', 'aten'), 'ATen')} products).",
           "", "| preset | parameters | step (ms, median) | p10–p90 (ms) | tokens/s | GFLOP/s | MFU |",
           "|---|---|---|---|---|---|---|"]
    out += [f"| `{r['preset']}` | {r['n_params']:,} | {r['step_time_s'] * 1e3:.1f} | "
            f"{r['step_time_p10_s'] * 1e3:.1f}–{r['step_time_p90_s'] * 1e3:.1f} | {r['tokens_per_s']:.0f} | "
            f"{r['achieved_flops'] / 1e9:.1f} | {r['mfu']:.0%} |" for r in result["presets"]]
    mib = lambda b: f"{b / 2**20:,.0f}" if b is not None else "n/a"  # noqa: E731
    before = result["presets"][0].get("previous_path", {"head_chunk": 0}) if result["presets"] else {"head_chunk": 0}
    settings = ", ".join(f'`{k} = {json.dumps(v)}`' for k, v in before.items())
    words = "the unchunked head" + (", AdamW's foreach path" if "adamw" in before else "") + (
        ", ATen's (MKL's) products" if "cpu_gemm" in before else "") + (
        ": the kernels of the committed CPU results" if "adamw" in before else "")
    out += ["", f"The training step (loss head in chunks of `head_chunk` tokens) against the previous path ({settings}: "
                f"{words}), interleaved in one process; peak memory of one training step above what the "
                "process held before it (CPU: tensors in PyTorch's allocator, through the profiler; CUDA: `max_memory_allocated`) and by "
                "`bench.memory.estimate_step_bytes`:", "",
            "| preset | head_chunk | step (ms) | previous step (ms) | previous / now | peak MiB | "
            "previous peak MiB | estimate MiB | previous estimate MiB | compile (s) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    out += [f"| `{r['preset']}` | {r['head_chunk']} | {r['step_time_s'] * 1e3:.1f} | {r['step_time_unchunked_s'] * 1e3:.1f} | "
            f"{r['unchunked_over_chunked']:.2f}× | {mib(r['peak_memory_bytes'])} | {mib(r['peak_memory_unchunked_bytes'])} | "
            f"{mib(r['estimated_memory_bytes'])} | {mib(r['estimated_memory_unchunked_bytes'])} | "
            f"{'%.1f' % r['compile_s'] if r.get('compile_s') is not None else '–'} |" for r in result["presets"]]
    if result.get("head"):
        h = result["head"]
        out += ["", f"The loss head alone at `{h['preset']}` (H = {h['width']}), V = {h['vocab_size']}, "
                    f"{h['tokens']:,} tokens, forward + backward: unchunked {h['unchunked_s'] * 1e3:.0f} ms and "
                    f"{mib(h['unchunked_peak_bytes'])} MiB; in chunks of {h['chunk']}: {h['chunked_s'] * 1e3:.0f} ms "
                    f"and {mib(h['chunked_peak_bytes'])} MiB (memory ratio {h.get('memory_ratio', float('nan')):.3f}, "
                    f"time ratio {h['time_ratio']:.2f})."]
    if result["overhead"]:
        over = [p for p in st.get("overhead_presets", []) if any(r.get("preset") == p for r in result["overhead"])]
        over = over or [""]
        cell = {(r.get("preset", ""), r["stabilizer"]): r for r in result["overhead"]}
        out += ["", f"Stabilizer overhead vs baseline: whole step (median over {st['rounds']} interleaved rounds of "
                    "the per-round ratio) and the stabilizer's hooks timed alone (forward + backward), "
                    "as a fraction of the baseline step:", "",
                "| stabilizer | " + " | ".join(f"`{p}` step (ms) | `{p}` whole step | `{p}` hooks alone"
                                             for p in over) + " |",
                "|---|" + "---|---|---|" * len(over)]
        for name in dict.fromkeys(r["stabilizer"] for r in result["overhead"]):
            label = f"`{name}`" if name != AA_CONTROL else f"{name}: a second baseline, the noise"
            out.append(f"| {label} | " + " | ".join(
                f"{cell[p, name]['step_time_s'] * 1e3:.1f} | {cell[p, name]['overhead']:+.1%} | "
                f"{cell[p, name].get('hook_overhead', float('nan')):+.1%}" for p in over) + " |")
        in_head = sorted({f"`{r['stabilizer']}`" for r in result["overhead"] if r.get("hook_in_head")})
        how = {r.get("head_capping") for r in result["overhead"] if r.get("hook_in_head")}
        if in_head:
            where = ("stabench's compiled kernel (`bench.native`: the capped softmax and its slope in one call per "
                     "chunk)" if how == {"kernel"} else "the logit GEMM's epilogue")
            out += ["", f"Hooks alone of {', '.join(in_head)}: the head takes its cap (`logit_cap`, oneDNN's products) "
                        f"into {where}, so they are what it adds to the chunked head, forward + backward: the head "
                        "with it minus the head without, each the median of its repetitions."]
        floors = [cell[p, "softcap"] for p in over if "floor_s" in cell.get((p, "softcap"), {})]
        if floors:
            out += ["", "Floor of soft-capping in separate passes (one sigmoid pass forward, one tanh-backward pass "
                        f"backward over the {st['batch_size'] * st['seq_len']} × {st['vocab_size']} logits, each into "
                        "a fresh buffer, timed alone): "
                    + ", ".join(f"{r['floor_s'] * 1e3:.1f} ms = {r['floor_overhead']:+.1%} of a `{r['preset']}` "
                                "baseline step" for r in floors) + "."]
    if result["layouts"]:
        r0 = result["layouts"][0]
        out += ["", f"Sweep throughput, {r0['trials']} `micro` trials of {r0['steps']} steps, unpacked (fresh worker "
                    "processes, warmed up before timing):", "",
                "| layout | trials/hour |", "|---|---|"]
        out += [f"| {r['layout']} | {r['trials_per_hour']:.0f} |" for r in result["layouts"]]
        d = result.get("default_layout")
        if d and d["default_vs_best"] is not None:
            out += ["", f"The sweep engine's default ({d['workers']} worker(s) × {d['threads']} thread(s)) reached "
                        f"{d['default_vs_best']:.0%} of the best layout ({d['best']})."]
    for p in result["packed"]:
        out += ["", f"Packed vs unpacked, {p['trials']} `{p['preset']}` trials of {p['steps']} steps "
                    f"(K = {p['k']}): best packed / best unpacked = **{p['factor']:.2f}×**. Ceilings: a pack whose "
                    f"matmuls ran at the measured GEMM peak could reach at most **{p['ceiling']:.2f}×**; one that "
                    f"also paid the least a softmax cross-entropy needs (one exp pass and one pass over its "
                    f"result per member, {p['softmax_floor_s'] * 1e3:.1f} ms per step, timed alone) at most "
                    f"**{p['ceiling_softmax']:.2f}×**", "",
                "| layout | trials/hour | training GFLOP/s | MFU |", "|---|---|---|---|"]
        out += [f"| {r['layout']} | {r['trials_per_hour']:.0f} | {r['achieved_flops'] / 1e9:.1f} | {r['mfu']:.0%} |"
                for r in p["rows"]]
    return "\n".join(out) + "\n"
