"""Trials/hour of short trials, packed vs unpacked, on this machine (``stabench perf`` calls this).

Layouts (``workers × threads``, workers are separate processes started before timing,
each with the data loaded, as sweep workers are):

- ``unpacked 1×C``: one worker with all C cores runs the trials one after another;
- ``unpacked C×1``: one single-threaded worker per core;
- ``packed 1×C``: one worker with all cores trains packs of K trials (``train_pack``);
- ``packed C×1``: one single-threaded worker per core, each training packs.

Trials are one base config with learning rates spread like ``stabench perf``'s layout
trials and one data seed (so that they can share packs); trials/hour is trials / wall
time. With ``rounds > 1`` the layouts are measured in turn, round after round, so that
load from other processes on a shared machine hits all of them alike; a layout's figure
is its median over rounds. ``python -m bench.pack.throughput PRESET`` runs all four.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import time
from typing import Any, Callable

from ..config import RunConfig, from_dict

LAYOUTS = ("unpacked 1xC", "unpacked Cx1", "packed 1xC", "packed Cx1")
_DATA: dict = {}


def _init_worker(threads: int, warm: list[dict[str, Any]], barrier) -> None:
    """Set threads, load data, train a short run and a short pack; then wait for the others."""
    from .. import runtime

    runtime.tune_allocator()
    runtime.set_threads(threads)
    short = [from_dict({**d, "steps": 12, "warmup": 2, "eval_every": 12}).to_dict() for d in warm[:2]]
    _job(("unpacked", short[:1]))
    _job(("packed", short))
    barrier.wait()


def _data(cfg: RunConfig):
    from ..data import load_data

    key = (cfg.data, cfg.vocab_size)
    if key not in _DATA:
        _DATA[key] = load_data(cfg.data, cfg.vocab_size)
    return _DATA[key]


def _job(job: tuple[str, list[dict[str, Any]]]) -> float:
    """Run unpacked trials or one pack in a worker; returns the CPU seconds it used (all threads)."""
    kind, dicts = job
    cfgs = [from_dict(d) for d in dicts]
    data = _data(cfgs[0])
    cpu = time.process_time()
    from ..trainer import train_members

    if kind == "unpacked":
        for c in cfgs:
            train_members([c], data=data)
    else:
        train_members(cfgs, data=data)
    return time.process_time() - cpu


def _time_layout(workers: int, threads: int, jobs: list[tuple[str, list[dict]]],
                 warm: list[dict]) -> tuple[float, float]:
    """Wall time and total worker CPU time of ``jobs`` on ``workers`` fresh, warmed-up worker processes."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(workers + 1)
    with ctx.Pool(workers, initializer=_init_worker, initargs=(threads, warm, barrier)) as pool:
        barrier.wait()
        t = time.perf_counter()
        cpu = pool.map(_job, jobs, chunksize=1)
        return time.perf_counter() - t, sum(cpu)


def trial_configs(base: RunConfig, n_trials: int, steps: int, threads: int) -> list[RunConfig]:
    """The trials every layout trains: ``base`` with learning rates base.lr·(1 + i/10)."""
    base = base.replace(steps=steps, warmup=min(base.warmup, steps // 2), eval_every=steps, threads=threads,
                        data_seed=base.resolved_data_seed)
    return [base.replace(lr=base.lr * (1 + i / 10)) for i in range(n_trials)]


def measure_pack_throughput(base: RunConfig | str, k: int | None = None, steps: int | None = None, *,
                            n_trials: int | None = None, cores: int | None = None,
                            layouts: tuple[str, ...] = ("packed 1xC", "packed Cx1"), rounds: int = 1,
                            log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Trials/hour of short trials of ``base`` under each layout in ``layouts`` (see the module doc).

    base: a RunConfig, or a preset name (then vocab 8192, batch 8, seq 64, fp32, synthetic data,
    as ``stabench perf`` on a CPU). k: pack size (default: n_trials / cores, at most 16, or 8).
    steps: per trial (default 300). n_trials: trials per layout; by default each worker gets
    two unpacked trials, or one pack of k trials. cores: default the usable cores.
    Returns one row per layout (keys: layout, workers, threads, k, trials, steps, wall_s and
    cpu_s — medians over rounds —, walls, cpus, trials_per_hour = trials / wall time, and
    trials_per_hour_cpu = trials / (CPU time / cores): the rate on otherwise idle cores,
    which other processes on a shared machine disturb much less), the shape of
    ``stabench perf``'s rows.
    """
    from .grouping import group_into_packs

    if isinstance(base, str):
        base = from_dict(dict(model=base, vocab_size=8192, batch_size=8, seq_len=64, precision="fp32",
                              warmup=10, lr=3e-3, data="synthetic:tokens=200000")).check()
    cores = cores or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    steps = steps or 300
    k = k or (min(16, max(1, n_trials // cores)) if n_trials else 8)
    for name in layouts:
        if name not in LAYOUTS:
            raise ValueError(f"unknown layout {name!r}; allowed: {', '.join(LAYOUTS)}")
    rows: dict[str, dict[str, Any]] = {}
    for _ in range(rounds):
        for name in layouts:
            kind, shape = name.split()
            workers, threads = (1, cores) if shape == "1xC" else (cores, 1)
            n = n_trials or (2 * workers if kind == "unpacked" else k * workers)
            cfgs = trial_configs(base, n, steps, threads)
            if kind == "unpacked":
                jobs = [("unpacked", [c.to_dict()]) for c in cfgs]
            else:
                jobs = [("packed", [c.to_dict() for c in p]) for p in group_into_packs(cfgs, k)]
            if log:
                log(f"{name}: {n} trials of {base.model} ({steps} steps) as {len(jobs)} job(s) "
                    f"on {workers} worker(s) x {threads} thread(s)…")
            wall, cpu = _time_layout(workers, threads, jobs, [c.to_dict() for c in cfgs[:2]])
            row = rows.setdefault(name, {"layout": f"{kind} {workers} worker(s) x {threads} thread(s)"
                                         + (f", K={k}" if kind == "packed" else ""),
                                         "workers": workers, "threads": threads, "k": k if kind == "packed" else 1,
                                         "trials": n, "steps": steps, "walls": [], "cpus": []})
            row["walls"].append(wall)
            row["cpus"].append(cpu)
            if log:
                log(f"  {wall:.1f} s wall, {cpu:.1f} s CPU: {n / wall * 3600:.0f} trials/hour")
    for row in rows.values():
        row["wall_s"] = statistics.median(row["walls"])
        row["cpu_s"] = statistics.median(row["cpus"])
        row["trials_per_hour"] = row["trials"] / row["wall_s"] * 3600
        # what the layout would reach on idle cores: its CPU time spread over all of them
        row["trials_per_hour_cpu"] = row["trials"] / row["cpu_s"] * 3600 * cores
    return list(rows.values())


def speedup(rows: list[dict[str, Any]], rate: str = "trials_per_hour") -> dict[str, Any]:
    """Best packed vs best unpacked ``rate`` among ``rows`` (of one measurement)."""
    packed = [r for r in rows if r["layout"].startswith("packed")]
    unpacked = [r for r in rows if r["layout"].startswith("unpacked")]
    best_p = max(packed, key=lambda r: r[rate]) if packed else None
    best_u = max(unpacked, key=lambda r: r[rate]) if unpacked else None
    out = {"best_packed": best_p, "best_unpacked": best_u}
    if best_p and best_u:
        out["factor"] = best_p[rate] / best_u[rate]
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.pack.throughput PRESET``: all four layouts, interleaved round after round."""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m bench.pack.throughput", description=main.__doc__)
    p.add_argument("preset")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--k", default="4,8", help="pack sizes measured in both packed layouts (comma-separated)")
    p.add_argument("--k-1xC", dest="k_1xc", default="16", help="extra pack sizes measured with 1 worker only")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    base = from_dict(dict(model=args.preset, vocab_size=args.vocab_size, batch_size=args.batch_size,
                          seq_len=args.seq_len, precision="fp32",
                          warmup=10, lr=3e-3, data="synthetic:tokens=200000")).check()
    plan = [(int(k), ("packed 1xC", "packed Cx1")) for k in filter(None, args.k.split(","))]
    plan += [(int(k), ("packed 1xC",)) for k in filter(None, args.k_1xc.split(","))]
    res: dict[str, dict[str, Any]] = {}
    for _ in range(args.rounds):
        rows = measure_pack_throughput(base, 8, args.steps, layouts=("unpacked 1xC", "unpacked Cx1"), log=print)
        for k, lays in plan:
            rows += measure_pack_throughput(base, k, args.steps, layouts=lays, log=print)
        for row in rows:
            e = res.setdefault(row["layout"], {**row, "rates": [], "rates_cpu": []})
            e["rates"].append(row["trials_per_hour"])
            e["rates_cpu"].append(row["trials_per_hour_cpu"])
    print(f"\n{args.preset}, V={args.vocab_size}, {args.steps} steps/trial, median of {args.rounds} round(s):")
    for name, e in res.items():
        e["trials_per_hour"] = statistics.median(e["rates"])
        e["trials_per_hour_cpu"] = statistics.median(e["rates_cpu"])
        print(f"  {name:46} {e['trials_per_hour']:7.0f} trials/h (wall)  {e['trials_per_hour_cpu']:7.0f} (CPU-based)")
    for rate in ("trials_per_hour", "trials_per_hour_cpu"):
        s = speedup(list(res.values()), rate)
        print(f"{rate}: best packed ({s['best_packed']['layout']}) / best unpacked "
              f"({s['best_unpacked']['layout']}) = {s['factor']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(list(res.values()), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
