"""``stabench device-check``: what one GPU must show before a sweep is sent to it, in one run.

Three stages, each timed, each recorded even when it fails (a stage that raises is an error in
the JSON, not a crash), within a wall-time budget (default 420 s on CUDA; presets left when the
budget is spent are recorded as skipped):

1. ``tests``: the ``cuda``-marked tests (``tests/test_cuda.py``) on the device: every stabilizer in
   bf16 autocast with fused AdamW, tied and untied; compile; a pack equal to its unpacked runs
   within bf16 tolerance; divergence isolation in a pack; checkpoint and resume.
2. ``perf``: ``bench.perf`` per preset (16M, 57M, 109M, 221M on CUDA at 16 × 2048 tokens, V = 50,304):
   step time, tokens/s, MFU against the measured bf16 GEMM peak, peak memory (``max_memory_allocated``),
   chunked vs unchunked loss head; the loss head alone; then 109M and 221M compiled (the study's
   ``compile = true``; compile time, without the unchunked comparison, which would compile twice).
3. ``packed``: trials/hour of short 16M trials packed (K = 4, 8, 16) vs one at a time, at 16 × 2048 tokens
   per step and at 8 × 256 (small trials, where packs would pay if anywhere).

Sized to the GPU at hand: a run or pack whose step would not fit ``MEMORY_FRACTION`` of its memory by
``bench.memory.estimate_step_bytes`` is not started, and a run that fails anyway (out of memory) is
recorded with its error while the next one runs. The result is saved after every row.

Output: ``<out>/gpu-<device>.json`` and ``.md`` (``<device>`` from the GPU's name, e.g.
``gpu-nvidia-h200``); the CPU dry run (``--device cpu --quick``: the same stages on tiny sizes, so
the script never rots) writes ``cpu-dry-run.json`` and ``.md``. ``scripts/device-check.sh`` wraps
it for a GPU node with the project's wheels.
"""
from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable

TARGETS = {"mfu_109M_221M": 0.40, "packed_factor_16M": 3.0}
"""The issue's GPU targets: MFU ≥ 40 % of the measured bf16 peak at 109M and 221M; packed 16M
trials ≥ 3× the trials/hour of unpacked ones."""
FIELDS = ("created_at", "device", "device_name", "quick", "budget_s", "wall_s", "versions", "stages", "targets")
STAGES = ("tests", "perf", "packed")


def plan(device: str, quick: bool) -> dict[str, Any]:
    """Sizes of each stage: the study's on CUDA, tiny ones for the CPU dry run."""
    if device == "cuda" and not quick:
        return {"presets": ["16M", "57M", "109M", "221M"], "compiled_presets": ["109M", "221M"],
                "batch_size": 16, "seq_len": 2048, "vocab_size": 50304,
                "pack_preset": "16M", "pack_ks": [4, 8, 16], "pack_steps": 30, "pack_small": [8, 256],
                "precision": "bf16", "budget_s": 420}
    return {"presets": ["nano", "micro"], "compiled_presets": ["nano"], "batch_size": 4, "seq_len": 32, "vocab_size": 512,
            "pack_preset": "nano", "pack_ks": [2, 4], "pack_steps": 5, "pack_small": [2, 16],
            "precision": "bf16" if device == "cuda" else "fp32", "budget_s": 300}


def _stage(fn: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Runs ``fn(out)``, which fills ``out`` as it measures (calling ``progress(out)`` after each row, so a
    check stopped mid-stage still leaves the rows it had), and returns ``out`` with ``ok``, ``seconds`` and,
    where it raised or some of its runs failed (``out["failed_runs"]``), ``error``."""
    t = time.perf_counter()
    out: dict[str, Any] = {}
    try:
        fn(out)
        ok, error = not out.get("failed_runs"), None
        if not ok:
            error = "; ".join(f"{f['run']}: {f['error']}" for f in out["failed_runs"])
    except Exception as e:  # noqa: BLE001 - a failed stage is a result of the check
        ok, error = False, f"{type(e).__name__}: {e}"
    res = {"ok": ok, **out, "seconds": time.perf_counter() - t}
    if error is not None:
        res["error"] = error
    return res


def _error(e: BaseException) -> str:
    """One line for a run that failed."""
    return f"{type(e).__name__}: {str(e)[:500]}"


def _release_cuda() -> None:
    """Frees what a finished (or failed) run left cached on the GPU, so that after a run out of memory
    the next one has the device's memory."""
    import gc

    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


MEMORY_FRACTION = 0.9
"""Share of the GPU's memory a run of the check may plan to use by ``bench.memory.estimate_step_bytes``
(the rest: the CUDA context, the allocator's rounding, what the estimate leaves out)."""


def device_budget_bytes(device: str) -> int | None:
    """MEMORY_FRACTION of the CUDA device's memory; None on the CPU (its dry run is tiny)."""
    if device != "cuda":
        return None
    from .memory import machine_bytes
    have = machine_bytes("cuda")
    return int(MEMORY_FRACTION * have[0]) if have else None


def memory_plan(cfg, previous, budget: int | None) -> tuple[bool, bool, str | None]:
    """(run the row, compare it with the previous path, why not) for a perf row of ``cfg``: the previous
    path's timer (``previous``, e.g. the unchunked head) lives beside ``cfg``'s in ``perf.preset_row``, so
    the comparison needs both estimates to fit ``budget`` bytes, the row its own. A GPU smaller than the
    H200 the check was written on (a 24 GB card, an 80 GB one) thus measures what fits and says what not."""
    from .memory import estimate_step_bytes, format_gib

    if budget is None:
        return True, True, None
    need = estimate_step_bytes(cfg)
    if need > budget:
        return False, False, (f"a step needs ~{format_gib(need)} by bench.memory's estimate, "
                              f"above {format_gib(budget)} here")
    both = need + (estimate_step_bytes(previous) if previous is not None else 0)
    if both > budget:
        return True, False, (f"the previous path's comparison needs ~{format_gib(both)} (both timers), "
                             f"above {format_gib(budget)} here")
    return True, True, None


def run_tests(device: str, repo: Path, timeout_s: float) -> dict[str, Any]:
    """``pytest -m cuda tests/test_cuda.py`` on ``device`` (``STABENCH_TEST_DEVICE``), counted from its JUnit XML,
    with each test's seconds. Past ``timeout_s`` pytest is stopped and the stage fails with its output's tail
    (which names the test it was in)."""
    test_file = repo / "tests" / "test_cuda.py"
    if not test_file.exists():
        raise FileNotFoundError(f"{test_file} (run the check from a checkout of the project)")
    with tempfile.TemporaryDirectory() as tmp:
        xml, log = Path(tmp) / "junit.xml", Path(tmp) / "pytest.log"
        env = {**os.environ, "STABENCH_TEST_DEVICE": device}
        with open(log, "w") as out:
            try:
                proc = subprocess.run([sys.executable, "-m", "pytest", "-v", "-m", "cuda", "-p", "no:cacheprovider",
                                       f"--junitxml={xml}", str(test_file)], cwd=repo, env=env, stdout=out,
                                      stderr=subprocess.STDOUT, timeout=timeout_s)
            except subprocess.TimeoutExpired:
                raise TimeoutError(f"the CUDA tests ran past {timeout_s:.0f} s; their output ends: "
                                   f"{log.read_text()[-1500:]}") from None
        tail = log.read_text()[-3000:]
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        cases = suite.findall("testcase")
        failed = [c.get("name") for c in cases if c.find("failure") is not None or c.find("error") is not None]
        skipped = [c.get("name") for c in cases if c.find("skipped") is not None]
        seconds = {c.get("name"): round(float(c.get("time", 0)), 2) for c in cases}
    return {"returncode": proc.returncode, "tests": len(cases), "passed": len(cases) - len(failed) - len(skipped),
            "failed": failed, "skipped": skipped, "test_seconds": seconds, "output_tail": tail}


def run_perf_stage(device: str, p: dict[str, Any], deadline: float, quick: bool, log,
                   out: dict[str, Any] | None = None, progress: Callable[[dict[str, Any]], None] | None = None
                   ) -> dict[str, Any]:
    """``bench.perf`` preset by preset (each a full result of its own), then the compiled presets, until
    ``deadline``, into ``out`` (``progress(out)`` after each). A run that raises (out of memory, say) is
    recorded in ``failed_runs`` and the next one runs; a run whose step would not fit the GPU by
    ``bench.memory``'s estimate is not started (``memory_skipped``), nor is a comparison with the previous
    path that would not (``comparison_skipped``)."""
    from .perf import perf_config, previous_path, run_perf

    out = {} if out is None else out
    out.update(presets=[], compiled=[], head=None, peak=None, skipped_presets=[], memory_skipped=[],
               comparison_skipped=[], failed_runs=[])
    budget, head_pending = device_budget_bytes(device), True  # the loss head alone: with the first run that ends
    runs = [(name, False) for name in p["presets"]] + [(name, True) for name in p["compiled_presets"]]
    for name, compile_ in runs:
        label = name + (" compiled" if compile_ else "")
        if time.monotonic() > deadline:
            out["skipped_presets"].append(label)
            continue
        cfg = perf_config(name, device=device, precision=p["precision"], threads=None, batch_size=p["batch_size"],
                          seq_len=p["seq_len"], vocab_size=p["vocab_size"], compile_=compile_)
        run, compare, why = memory_plan(cfg, None if compile_ else cfg.replace(**previous_path(cfg)), budget)
        if not run:
            out["memory_skipped"].append({"run": label, "reason": why})
        else:
            if why is not None:
                out["comparison_skipped"].append({"run": label, "reason": why})
            try:
                res = run_perf([name], quick=quick, device=device, precision=p["precision"], threads=None,
                               batch_size=p["batch_size"], seq_len=p["seq_len"], vocab_size=p["vocab_size"],
                               compile_=compile_, sections={"head"} if head_pending else set(),
                               compare=compare and not compile_, log=log)
                head_pending = False
                out["compiled" if compile_ else "presets"].extend(res["presets"])
                out["head"] = out["head"] or res["head"]
                out["peak"] = out["peak"] or res["peak"]
            except Exception as e:  # noqa: BLE001 - one preset's failure (out of memory) is a row of the result
                out["failed_runs"].append({"run": label, "error": _error(e)})
                log(f"device check: {label} failed: {out['failed_runs'][-1]['error']}")
            _release_cuda()
        if progress is not None:
            progress(out)
    return out


def run_packed_stage(device: str, p: dict[str, Any], deadline: float, out: dict[str, Any] | None = None,
                     progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Trials/hour of ``pack_preset`` trials (``pack_steps`` steps, learning rates spread by 10 %):
    one unpacked trial timed alone, then packs of each K, each trial set trained to completion; at the
    check's tokens per step (the target's rows), then at ``pack_small`` (batch, seq_len): small trials,
    where a pack has launch gaps to fill if anywhere (what ``pack = "auto"`` on CUDA should know). Into
    ``out``, ``progress(out)`` after each row; a pack that would not fit the GPU is skipped, one that
    raises is a row with its error."""
    out = {} if out is None else out
    out.update(preset=p["pack_preset"], steps=p["pack_steps"], rows=[], failed_runs=[])
    report = (lambda: progress(out)) if progress is not None else (lambda: None)
    _pack_rows(device, p, deadline, p["batch_size"], p["seq_len"], out, out["failed_runs"], report)
    b, t = p["pack_small"]
    if time.monotonic() < deadline:
        out["small"] = {"batch_size": b, "seq_len": t, "rows": []}
        _pack_rows(device, p, deadline, b, t, out["small"], out["failed_runs"], report)
    return out


def _pack_rows(device: str, p: dict[str, Any], deadline: float, batch_size: int, seq_len: int,
               into: dict[str, Any], failed: list[dict[str, Any]], report: Callable[[], None]) -> None:
    """The unpacked trial's median seconds into ``into["unpacked_trial_s"]``, then one row per K appended to
    ``into["rows"]`` (``report()`` after each); a K that raises is also appended to ``failed``."""
    import torch

    from .config import from_dict
    from .memory import estimate_step_bytes, format_gib
    from .pack import train_pack
    from .trainer import train

    base = dict(model=p["pack_preset"], vocab_size=p["vocab_size"], seq_len=seq_len, batch_size=batch_size,
                steps=p["pack_steps"], warmup=1, eval_every=p["pack_steps"], eval_batches=1, final_eval_batches=1,
                log_every=5, data="synthetic:tokens=200000", device=device, precision=p["precision"], data_seed=0)

    def cfgs(k: int):
        return [from_dict({**base, "lr": 1e-3 * (1 + i / 10), "seed": i + 1}).check() for i in range(k)]

    def timed(fn) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    train(cfgs(1)[0])  # warm up: kernels, allocator, data
    unpacked_s = into["unpacked_trial_s"] = statistics.median(timed(lambda: train(cfgs(1)[0])) for _ in range(2))
    rows, budget = into["rows"], device_budget_bytes(device)
    for k in p["pack_ks"]:
        members = cfgs(k)
        if time.monotonic() > deadline:
            rows.append({"k": k, "skipped": "time budget"})
        elif budget is not None and (need := k * estimate_step_bytes(members[0])) > budget:
            rows.append({"k": k, "skipped": f"memory: {k} members' steps need ~{format_gib(need)} by "
                                            f"bench.memory's estimate, above {format_gib(budget)} here"})
        else:
            try:
                secs = timed(lambda: train_pack(members))
                rows.append({"k": k, "seconds": secs, "packed_trials_per_hour": 3600 * k / secs,
                             "unpacked_trials_per_hour": 3600 / unpacked_s, "factor": unpacked_s * k / secs})
            except Exception as e:  # noqa: BLE001 - a pack that fails (out of memory) is a row of the result
                rows.append({"k": k, "error": _error(e)})
                failed.append({"run": f"pack K = {k} at {batch_size} x {seq_len}", "error": rows[-1]["error"]})
            _release_cuda()
        report()


def device_slug(device: str) -> str:
    """``gpu-<name>`` for a CUDA device (``gpu-nvidia-h200``), ``cpu-dry-run`` for the CPU."""
    if device != "cuda":
        return "cpu-dry-run"
    import torch
    return "gpu-" + re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")


def check(device: str, quick: bool, repo: Path, budget_s: float | None = None, log=print,
          save: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the three stages; the result has every key of ``FIELDS`` and every stage of ``STAGES``.
    ``save(result)`` is called after each stage and each row of a stage with the result so far (stages not
    yet run say so, a stage under way says it stopped mid-stage), so a check stopped from outside still
    leaves what it measured."""
    import torch

    from . import provenance

    if device == "cuda" and not torch.cuda.is_available():
        from .errors import UsageError
        raise UsageError("--device cuda: no CUDA device is visible here (torch.cuda.is_available() is False)")
    p = plan(device, quick)
    budget = budget_s or p["budget_s"]
    start = time.monotonic()
    deadline = start + budget
    stages: dict[str, Any] = {s: {"ok": False, "error": "not run: the check stopped before this stage"}
                              for s in STAGES}
    head = {"created_at": provenance.utc_now(), "device": device,
            "device_name": provenance.device_name(torch.device(device)), "quick": quick, "budget_s": budget,
            "versions": provenance.versions(), "plan": p}

    def result() -> dict[str, Any]:
        return {**head, "wall_s": time.monotonic() - start, "stages": stages, "targets": targets(stages)}

    runs = {"tests": lambda out, _: out.update(run_tests(device, repo, timeout_s=max(budget * 0.5, 60))),
            "perf": lambda out, progress: out.update(run_perf_stage(device, p, deadline - budget * 0.15, quick, log,
                                                                    out, progress)),
            "packed": lambda out, progress: out.update(run_packed_stage(device, p, deadline, out, progress))}
    for name in STAGES:
        log(f"device check on {device}: {name}…")

        def progress(partial: dict[str, Any], name: str = name) -> None:  # a stage stopped here keeps these rows
            stages[name] = {"ok": False, "error": "stopped mid-stage: the rows so far", **partial}
            if save is not None:
                save(result())

        stages[name] = _stage(lambda out: runs[name](out, progress))
        log(f"device check: {name} {'done' if stages[name]['ok'] else 'FAILED: ' + stages[name]['error'][:500]} "
            f"in {stages[name]['seconds']:.0f} s")
        if save is not None:
            save(result())
    return result()


def targets(stages: dict[str, Any]) -> dict[str, Any]:
    """The issue's GPU targets against what the stages measured (None where a stage did not measure it).
    MFU is judged on the compiled rows where the check has them (the study's protocol compiles), the eager
    rows beside them."""
    eager = {r["preset"]: r["mfu"] for r in stages["perf"].get("presets", [])}
    compiled = {r["preset"]: r["mfu"] for r in stages["perf"].get("compiled", [])}
    mfu = compiled or eager
    factors = [r["factor"] for r in stages["packed"].get("rows", []) if "factor" in r]
    return {"mfu_109M_221M": {"target": TARGETS["mfu_109M_221M"], "measured": {k: mfu.get(k) for k in ("109M", "221M")},
                              "of": "compiled" if compiled else "eager",
                              "eager": {k: eager.get(k) for k in ("109M", "221M")},
                              "met": all((mfu.get(k) or 0) >= TARGETS["mfu_109M_221M"] for k in ("109M", "221M"))},
            "packed_factor_16M": {"target": TARGETS["packed_factor_16M"], "measured": max(factors, default=None),
                                  "met": max(factors, default=0) >= TARGETS["packed_factor_16M"]}}


def markdown(res: dict[str, Any]) -> str:
    """The check as the README's tables."""
    st = res["stages"]
    t = st["tests"]
    out = [f"# Device check: {res['device_name']} ({res['created_at'][:10]}, {res['wall_s']:.0f} s"
           f"{', quick' if res['quick'] else ''})", "",
           f"CUDA tests: {t.get('passed', 0)}/{t.get('tests', 0)} passed" +
           (f", failed: {', '.join(t['failed'])}" if t.get("failed") else "") +
           (f" — stage error: {t['error']}" if not t["ok"] else ""), ""]
    perf = st["perf"]
    gib = lambda b: f"{b / 2**30:.1f}" if b is not None else "n/a"  # noqa: E731
    ms = lambda s: f"{s * 1e3:.1f}" if s is not None else "–"  # noqa: E731
    first = (perf.get("presets") or perf.get("compiled") or [None])[0]
    if first is not None:
        peak = next(iter(perf["peak"].values()))
        out += [f"GEMM peak {peak['flops'] / 1e12:.1f} TFLOP/s ({peak['dtype']}, {peak.get('method', '')}); "
                f"{first['batch_size']} × {first['seq_len']} tokens per step, the loss head in chunks of "
                f"{first['head_chunk']} tokens (unchunked: `head_chunk = 0`)."]
    if perf.get("presets"):
        out += ["", "Eager:", "",
                "| preset | step (ms) | tokens/s | MFU | peak memory (GiB) | unchunked step (ms) | unchunked peak (GiB) |",
                "|---|---|---|---|---|---|---|"]
        out += [f"| `{r['preset']}` | {r['step_time_s'] * 1e3:.1f} | {r['tokens_per_s']:,.0f} | {r['mfu']:.0%} | "
                f"{gib(r['peak_memory_bytes'])} | {ms(r['step_time_unchunked_s'])} | "
                f"{gib(r['peak_memory_unchunked_bytes'])} |" for r in perf["presets"]]
    if perf.get("compiled"):
        out += ["", "Compiled (the study's `compile = true`; first step's compile time):", "",
                "| preset | step (ms) | tokens/s | MFU | peak memory (GiB) | compile (s) |", "|---|---|---|---|---|---|"]
        out += [f"| `{r['preset']}` | {r['step_time_s'] * 1e3:.1f} | {r['tokens_per_s']:,.0f} | {r['mfu']:.0%} | "
                f"{gib(r['peak_memory_bytes'])} | {r['compile_s']:.0f} |" for r in perf["compiled"]]
    if perf.get("skipped_presets"):
        out += ["", f"Skipped (time budget): {', '.join(perf['skipped_presets'])}."]
    notes = [f"- {what}: {r['run']}: {r.get('reason') or r.get('error')}"
             for key, what in (("memory_skipped", "not run (memory)"), ("comparison_skipped", "unchunked comparison not run"),
                               ("failed_runs", "failed")) for r in perf.get(key, [])]
    out += [""] + notes if notes else []
    if not perf["ok"] and not perf.get("failed_runs"):
        out += ["", f"perf stage error: {perf['error']}"]
    pk = st["packed"]
    if pk.get("rows"):
        out += ["", f"Packed vs unpacked `{pk['preset']}` trials of {pk['steps']} steps "
                    f"(unpacked: {pk['unpacked_trial_s']:.1f} s per trial):", "", "| K | trials/hour packed | "
                    "trials/hour unpacked | factor |", "|---|---|---|---|"]
        out += [f"| {r['k']} | {r['packed_trials_per_hour']:.0f} | {r['unpacked_trials_per_hour']:.0f} | "
                f"{r['factor']:.2f}× |" if "factor" in r else f"| {r['k']} | {_not_measured(r)} | | |" for r in pk["rows"]]
        sm = pk.get("small")
        if sm and "unpacked_trial_s" in sm:
            out += ["", f"Small trials ({sm['batch_size']} × {sm['seq_len']} tokens per step; unpacked: "
                        f"{sm['unpacked_trial_s']:.1f} s per trial): " +
                    ", ".join(f"K = {r['k']} {r['factor']:.2f}×" if "factor" in r else f"K = {r['k']} {_not_measured(r)}"
                              for r in sm["rows"]) + "."]
    if not pk["ok"] and not pk.get("failed_runs"):
        out += ["", f"packed stage error: {pk['error']}"]
    tg = targets(st)  # from the stages, so a JSON written by an earlier version renders the same way
    pct = lambda x: "n/a" if x is None else f"{x:.1%}"  # noqa: E731
    m, f = tg["mfu_109M_221M"], tg["packed_factor_16M"]
    out += ["", f"Targets: MFU ≥ {m['target']:.0%} at 109M and 221M ({m['of']}): "
                f"{' / '.join(pct(v) for v in m['measured'].values())}, {'met' if m['met'] else 'not met'}"
                + (f" (eager {' / '.join(pct(v) for v in m['eager'].values())})" if m["of"] == "compiled" else "")
                + f"; packed 16M trials ≥ {f['target']:.0f}× unpacked: "
                + ("n/a" if f["measured"] is None else f"{f['measured']:.2f}×") + f", {'met' if f['met'] else 'not met'}."]
    return "\n".join(out) + "\n"


def _not_measured(row: dict[str, Any]) -> str:
    """A pack row without a factor: why (skipped, and for what; or the error it raised)."""
    return f"skipped ({row['skipped']})" if "skipped" in row else f"failed ({row.get('error', '')})"


def configure(name: str, p) -> None:
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cuda: the check on this node's GPU; cpu: the dry run (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: the dry run, not a measurement")
    p.add_argument("--out", default="results/perf", metavar="DIR",
                   help="folder for gpu-<device>.json and .md (cpu-dry-run.* on CPU) (default: %(default)s)")
    p.add_argument("--budget-s", type=float, default=None, metavar="SECONDS",
                   help="wall-time budget of the whole check (default: 420 on CUDA, 300 for the dry run)")


def main(name: str, args) -> int:
    from .errors import UsageError

    if args.budget_s is not None and not args.budget_s > 0:
        raise UsageError(f"--budget-s must be > 0 seconds, got {args.budget_s}")
    repo = Path(__file__).resolve().parent.parent
    out = Path(args.out)

    from .records import atomic_write

    def save(res: dict[str, Any]) -> None:  # a reader never sees half a file, even when the check is stopped mid-write
        stem = out / device_slug(args.device)
        for suffix, text in ((".json", json.dumps(res, indent=2, default=str) + "\n"), (".md", markdown(res))):
            atomic_write(stem.with_suffix(suffix), lambda tmp: tmp.write_text(text))

    res = check(args.device, args.quick, repo, args.budget_s, log=lambda m: print(m, file=sys.stderr, flush=True),
                save=save)
    print(markdown(res))
    print(f"wrote {out / device_slug(args.device)}.json and .md")
    return 0 if all(res["stages"][s]["ok"] for s in STAGES) and not res["stages"]["tests"].get("failed") else 1
