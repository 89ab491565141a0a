"""`stabench perf` in quick mode: every promised field, positive and self-consistent numbers."""
import json
import os
import math
import statistics

import pytest
import torch

from bench import gemm
from helpers import tiny_config
from test_external_stabilizer import stabench


def test_perf_quick_writes_consistent_json(tmp_path):
    out = tmp_path / "perf.json"
    r = stabench(["perf", "--quick", "--preset", "nano", "--skip", "layouts", "--overhead-preset", "nano",
                  "--overhead-preset", "micro", "--json", str(out)])
    assert r.returncode == 0, r.stderr
    assert "MFU" in r.stdout and "overhead" in r.stdout
    res = json.loads(out.read_text())
    assert {"machine", "versions", "settings", "peak", "presets", "overhead"} <= set(res)
    peak = res["peak"][res["settings"]["precision"].replace("fp32", "float32").replace("bf16", "bfloat16")]
    assert peak["flops"] > 1e9  # any CPU of this decade does > 1 GFLOP/s
    (row,) = res["presets"]
    assert row["preset"] == "nano" and row["n_params"] > 0
    assert row["step_time_p10_s"] <= row["step_time_s"] <= row["step_time_p90_s"]
    assert math.isclose(row["tokens_per_s"] * row["step_time_s"], row["tokens_per_step"], rel_tol=1e-9)
    assert math.isclose(row["achieved_flops"], row["flops_per_token"] * row["tokens_per_s"], rel_tol=1e-9)
    assert math.isclose(row["mfu"], row["achieved_flops"] / peak["flops"], rel_tol=1e-9)
    assert 0 < row["mfu"] < 1.5  # a ratio against the measured peak, not an absolute guess
    # the chunked head against the unchunked one (head_chunk = 0, the path before it), and memory
    assert row["head_chunk"] == res["settings"]["head_chunk"] > 0
    assert row["step_time_unchunked_s"] > 0 and row["unchunked_over_chunked"] > 0
    assert row["peak_memory_bytes"] > 0 and row["peak_memory_unchunked_bytes"] > 0
    assert row["estimated_memory_bytes"] < row["estimated_memory_unchunked_bytes"] or \
        row["tokens_per_step"] <= row["head_chunk"]
    assert row["first_step_s"] > 0 and row["compile_s"] is None  # not compiled
    head = res["head"]
    assert head["preset"] == "16M" and head["vocab_size"] == 50304 and head["tokens"] == 512
    assert head["chunked_peak_bytes"] > 0 and head["unchunked_peak_bytes"] > 0 and head["chunked_s"] > 0
    assert math.isclose(head["memory_ratio"], head["chunked_peak_bytes"] / head["unchunked_peak_bytes"])
    assert "unchunked" in r.stdout and "loss head alone" in r.stdout
    assert res["settings"]["overhead_presets"] == ["nano", "micro"]
    for preset in ("nano", "micro"):  # each preset's overheads are relative to its own baseline
        rows = [o for o in res["overhead"] if o["preset"] == preset]
        assert {o["stabilizer"] for o in rows} == {"baseline", "zloss", "softcap", "muloss", "mucentering",
                                                   "baseline (A/A)"}
        base = next(o for o in rows if o["stabilizer"] == "baseline")
        assert base["overhead"] == 0.0 and base["round_ratios"] == [1.0] * res["settings"]["rounds"]
        for o in rows:  # the median over rounds of each round's step-time ratio to baseline
            assert len(o["round_ratios"]) == res["settings"]["rounds"] and o["step_time_s"] > 0
            assert math.isclose(o["overhead"], statistics.median(o["round_ratios"]) - 1, rel_tol=1e-9, abs_tol=1e-12)
            assert math.isclose(o["hook_overhead"], o["hook_s"] / base["step_time_s"], rel_tol=1e-9)
            # the hooks are timed in every round too, and reported as the median over rounds
            assert len(o["hook_round_s"]) == res["settings"]["rounds"]
            assert o["hook_s"] == statistics.median(o["hook_round_s"])
            # only what a stabilizer adds is timed: a baseline's hooks do nothing and cost nothing
            assert (o["hook_s"] == 0) == o["stabilizer"].startswith("baseline")
            # soft-capping in the head's GEMM (fp32 in oneDNN) is timed as what it adds to the head
            in_head = (res["settings"]["precision"] == "fp32" and res["settings"]["cpu_gemm"] == "onednn"
                       and gemm.sigmoid_epilogue_available())
            assert o["hook_in_head"] == (o["stabilizer"] == "softcap" and in_head)
        cap = next(o for o in rows if o["stabilizer"] == "softcap")
        assert cap["floor_s"] > 0 and math.isclose(cap["floor_overhead"], cap["floor_s"] / base["step_time_s"])
        assert cap["floor_s"] == statistics.median(cap["floor_round_s"]) and len(cap["floor_round_s"]) == len(
            cap["hook_round_s"])


def test_perf_layouts_report_trials_per_hour(tmp_path):
    out = tmp_path / "perf.json"
    r = stabench(["perf", "--quick", "--preset", "nano", "--skip", "overhead", "--skip", "packed", "--json", str(out)])
    assert r.returncode == 0, r.stderr
    layouts = json.loads(out.read_text())["layouts"]
    cores = len(os.sched_getaffinity(0))
    assert {(l["workers"], l["threads"]) for l in layouts} >= {(1, cores), (cores, 1)}
    for l in layouts:
        assert math.isclose(l["trials_per_hour"], l["trials"] / l["wall_s"] * 3600, rel_tol=1e-9)
    d = json.loads(out.read_text())["default_layout"]
    best = max(l["trials_per_hour"] for l in layouts)
    mine = next(l for l in layouts if (l["workers"], l["threads"]) == (d["workers"], d["threads"]))
    assert math.isclose(d["default_vs_best"], mine["trials_per_hour"] / best, rel_tol=1e-9)


def test_perf_compares_packed_and_unpacked_trials_and_writes_markdown(tmp_path):
    out, md = tmp_path / "perf.json", tmp_path / "perf.md"
    r = stabench(["perf", "--quick", "--preset", "nano", "--skip", "overhead", "--json", str(out),
                  "--markdown", str(md)])
    assert r.returncode == 0, r.stderr
    (packed,) = json.loads(out.read_text())["packed"]
    assert packed["preset"] == "nano"
    rows = {row["layout"].split(",")[0]: row for row in packed["rows"]}
    cores = len(os.sched_getaffinity(0))
    assert set(rows) == {f"{kind} {w} worker(s) x {t} thread(s)" for kind in ("packed", "unpacked")
                         for w, t in ((1, cores), (cores, 1))}
    for row in packed["rows"]:
        assert row["trials"] == packed["trials"] and row["trials_per_hour"] > 0
    best = {kind: max(x["trials_per_hour"] for x in packed["rows"] if x["layout"].startswith(kind))
            for kind in ("packed", "unpacked")}
    assert math.isclose(packed["factor"], best["packed"] / best["unpacked"], rel_tol=1e-9)
    res = json.loads(out.read_text())
    # the peak of the run's precision ("auto" is bf16 on a CPU with bf16 matrix units, fp32 elsewhere)
    peak = res["peak"][res["settings"]["precision"].replace("fp32", "float32").replace("bf16", "bfloat16")]["flops"]
    for row in packed["rows"]:  # training FLOPs of the trials over the wall time, against the same peak
        assert math.isclose(row["mfu"], row["achieved_flops"] / peak, rel_tol=1e-9)
        assert math.isclose(row["achieved_flops"] / row["trials_per_hour"] * 3600,
                            row["steps"] * 8 * 64 * res["presets"][0]["flops_per_token"], rel_tol=1e-9)
    unpacked_best = max((x for x in packed["rows"] if x["layout"].startswith("unpacked")),
                        key=lambda x: x["trials_per_hour"])
    assert math.isclose(packed["ceiling"], peak / unpacked_best["achieved_flops"], rel_tol=1e-9)
    # the tighter ceiling adds the softmax's own passes to the matmuls' time at peak, per trial
    flops_per_trial = unpacked_best["achieved_flops"] * unpacked_best["wall_s"] / unpacked_best["trials"]
    t_min = flops_per_trial / peak + packed["steps"] * packed["softmax_floor_s"]
    assert packed["softmax_floor_s"] > 0 and packed["ceiling_softmax"] < packed["ceiling"]
    assert math.isclose(packed["ceiling_softmax"], 3600 / unpacked_best["trials_per_hour"] / t_min, rel_tol=1e-9)
    text = md.read_text()
    assert "| `nano` |" in text and f"= **{packed['factor']:.2f}×**" in text and "MFU" in text
    assert f"at most **{packed['ceiling']:.2f}×**" in text and f"at most **{packed['ceiling_softmax']:.2f}×**" in text


@pytest.mark.parametrize("library", ["aten", "onednn"])
def test_soft_cappings_hooks_alone_are_what_it_adds_to_the_head_where_the_gemm_takes_its_cap(library, monkeypatch):
    """With oneDNN's products the cap goes into the logit GEMM: no hook of its own runs, and its time is the
    head with the cap minus the head without (``capped_head_time``); with ATen's the transform's hooks are timed."""
    from bench.perf import capped_head_time, head_cap, hook_time
    from bench.train_module import SingleModule

    from bench.head import fuses_cap

    if library == "onednn" and not (gemm.onednn_available() and fuses_cap("fp32", torch.device("cpu"), "onednn")):
        pytest.skip("this PyTorch has no oneDNN fp32 matmul on this CPU, or neither the compiled kernel nor oneDNN's "
                    "sigmoid epilogue: soft-capping runs its own hooks")
    s = SingleModule(tiny_config(cpu_gemm=library, precision="fp32", head_chunk=64, stabilizer="softcap",
                                 hparams={"cap": 30.0}))
    y = torch.randint(0, 256, (4, 32))
    assert head_cap(s) == (30.0 if library == "onednn" else None)
    from bench.native import capped_kernel
    from bench.perf import head_capping
    assert head_capping(s) == (None if library == "aten" else "kernel" if capped_kernel() else "epilogue")
    calls = []
    monkeypatch.setattr("bench.perf.capped_head_time", lambda *a, **k: calls.append(a) or 1.0)
    hook_time(s, y, reps=2)
    assert len(calls) == (library == "onednn")
    monkeypatch.undo()
    if library == "onednn":
        assert math.isfinite(capped_head_time(s, y, 30.0, reps=3))
