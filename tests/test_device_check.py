"""The prepared device check's CPU dry run (``stabench device-check --device cpu --quick``) runs every
stage of the GPU check on tiny sizes and writes a JSON with every field, so the check cannot rot
between the GPUs that run it."""
import json

from test_external_stabilizer import stabench


def test_the_cpu_dry_run_writes_every_field(tmp_path):
    r = stabench(["device-check", "--device", "cpu", "--quick", "--out", str(tmp_path)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "cpu-dry-run.json").read_text())
    from bench.device_check import FIELDS, STAGES
    assert set(FIELDS) <= set(res) and set(STAGES) == set(res["stages"])
    assert all(res["stages"][s]["ok"] for s in STAGES), {s: res["stages"][s].get("error") for s in STAGES}
    tests = res["stages"]["tests"]
    assert tests["tests"] >= 14 and tests["passed"] == tests["tests"] and not tests["failed"]  # ran, not skipped
    perf = res["stages"]["perf"]
    assert [r["preset"] for r in perf["presets"]] == ["nano", "micro"] and perf["head"]["chunked_peak_bytes"] > 0
    assert perf["failed_runs"] == perf["memory_skipped"] == perf["comparison_skipped"] == perf["skipped_presets"] == []
    for row in perf["presets"]:
        assert row["step_time_s"] > 0 and 0 < row["mfu"] < 1.5 and row["peak_memory_bytes"] > 0
        assert row["step_time_unchunked_s"] > 0
    (compiled,) = perf["compiled"]  # the study's compile = true, without the unchunked comparison
    assert compiled["preset"] == "nano" and compiled["compile"] and compiled["compile_s"] is not None
    assert compiled["step_time_s"] > 0 and compiled["step_time_unchunked_s"] is None
    packed = res["stages"]["packed"]
    assert [r["k"] for r in packed["rows"]] == [2, 4]
    assert all(r["packed_trials_per_hour"] > 0 and r["factor"] > 0 for r in packed["rows"])
    small = packed["small"]  # small trials too: where packs would pay on a GPU if anywhere
    assert (small["batch_size"], small["seq_len"]) == (2, 16) and [r["k"] for r in small["rows"]] == [2, 4]
    assert all(r["factor"] > 0 for r in small["rows"])
    assert set(res["targets"]) == {"mfu_109M_221M", "packed_factor_16M"}
    md = (tmp_path / "cpu-dry-run.md").read_text()
    assert "CUDA tests: " in md and "| `micro` |" in md and "Packed vs unpacked" in md and "Compiled" in md
    assert "Small trials (2 × 16 tokens" in md


def test_device_check_on_a_machine_without_cuda_is_one_line_and_exit_2(tmp_path):
    import torch
    if torch.cuda.is_available():
        import pytest
        pytest.skip("this machine has CUDA: the refusal is for machines without it")
    r = stabench(["device-check", "--device", "cuda", "--out", str(tmp_path)])
    assert r.returncode == 2 and "no CUDA device" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_the_check_saves_after_every_stage_so_a_stopped_check_leaves_what_it_measured(monkeypatch):
    from bench import device_check as dc

    monkeypatch.setattr(dc, "run_tests", lambda *a, **k: {"tests": 3, "passed": 3, "failed": [], "skipped": []})
    monkeypatch.setattr(dc, "run_perf_stage", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("CUDA OOM")))
    monkeypatch.setattr(dc, "run_packed_stage", lambda *a, **k: {"rows": []})
    saved = []
    dc.check("cpu", True, None, save=lambda r: saved.append(json.loads(json.dumps(r, default=str))), log=lambda m: None)
    assert len(saved) == len(dc.STAGES)
    first = saved[0]
    assert first["stages"]["tests"]["ok"] and first["stages"]["tests"]["passed"] == 3
    assert [first["stages"][s]["ok"] for s in ("perf", "packed")] == [False, False]
    assert "not run" in first["stages"]["perf"]["error"]
    assert "CUDA OOM" in saved[1]["stages"]["perf"]["error"]  # a failed stage is a result, the next one still runs
    assert saved[2]["stages"]["packed"]["ok"]
    for partial in saved:  # every saved state renders
        md = dc.markdown(partial)
        assert "CUDA tests: 3/3 passed" in md and "Targets:" in md


def _fake_row(name: str, compile_: bool, compare: bool) -> dict:
    return {"preset": name, "batch_size": 4, "seq_len": 32, "head_chunk": 256, "step_time_s": 0.01,
            "tokens_per_s": 12800.0, "mfu": 0.3, "peak_memory_bytes": 2**20, "compile": compile_,
            "compile_s": 1.0 if compile_ else None, "step_time_unchunked_s": 0.02 if compare else None,
            "peak_memory_unchunked_bytes": 2**21 if compare else None}


def _fake_perf(calls: list, fail: set[str] = frozenset()):
    def run_perf(presets, *, compile_, compare, sections, **_):
        (name,) = presets
        calls.append((name, compile_, compare))
        if (name, compile_) in fail:
            raise RuntimeError("CUDA out of memory. Tried to allocate 12.00 GiB")
        return {"presets": [_fake_row(name, compile_, compare)], "peak": {"bfloat16": {"flops": 1e12, "dtype": "bfloat16"}},
                "head": {"chunked_peak_bytes": 1} if "head" in sections else None}
    return run_perf


def test_a_preset_that_fails_is_a_row_of_the_result_and_the_others_are_still_measured(monkeypatch):
    """A GPU smaller than the one the check was written for may run out of memory at one preset:
    that preset's error is recorded, the presets after it still run, and the stage says it failed."""
    from bench import device_check as dc, perf

    calls = []
    monkeypatch.setattr(perf, "run_perf", _fake_perf(calls, fail={("nano", False)}))
    res = dc._stage(lambda out: dc.run_perf_stage("cpu", dc.plan("cpu", True), float("inf"), True, lambda m: None, out))
    assert [c[:2] for c in calls] == [("nano", False), ("micro", False), ("nano", True)]
    assert [r["preset"] for r in res["presets"]] == ["micro"] and [r["preset"] for r in res["compiled"]] == ["nano"]
    assert res["head"] is not None  # the loss head alone is measured with the first preset that runs
    assert not res["ok"] and res["failed_runs"] == [{"run": "nano", "error": res["failed_runs"][0]["error"]}]
    assert "out of memory" in res["error"] and res["error"].startswith("nano: RuntimeError")
    md = dc.markdown({"device_name": "test", "created_at": "2026-12-04", "wall_s": 1.0, "quick": True,
                      "stages": {"tests": {"ok": True, "tests": 1, "passed": 1}, "perf": res,
                                 "packed": {"ok": True, "rows": []}}})
    assert "| `micro` |" in md and "- failed: nano: RuntimeError: CUDA out of memory" in md


def test_runs_that_would_not_fit_the_gpu_by_the_estimate_are_not_started(monkeypatch):
    """On a GPU with less memory, a preset whose step does not fit (by ``bench.memory``'s estimate) is
    skipped with the arithmetic, and one whose step fits but not beside the unchunked comparison's
    timer runs without the comparison."""
    from bench import device_check as dc, perf
    from bench.memory import estimate_step_bytes

    p = dc.plan("cpu", True)
    cfg = {name: perf.perf_config(name, device="cpu", precision=p["precision"], threads=None, batch_size=p["batch_size"],
                                  seq_len=p["seq_len"], vocab_size=p["vocab_size"], compile_=False)
           for name in p["presets"]}
    est = {name: estimate_step_bytes(c) for name, c in cfg.items()}
    both = {name: est[name] + estimate_step_bytes(c.replace(**perf.previous_path(c))) for name, c in cfg.items()}
    assert both["nano"] < est["micro"]  # a budget between them: nano compared, micro not run
    calls = []
    monkeypatch.setattr(perf, "run_perf", _fake_perf(calls))
    monkeypatch.setattr(dc, "device_budget_bytes", lambda device: (both["nano"] + est["micro"]) // 2)
    res = dc._stage(lambda out: dc.run_perf_stage("cpu", p, float("inf"), True, lambda m: None, out))
    assert res["ok"] and calls == [("nano", False, True), ("nano", True, False)]
    assert [r["run"] for r in res["memory_skipped"]] == ["micro"] and "GiB" in res["memory_skipped"][0]["reason"]
    assert not res["comparison_skipped"]
    monkeypatch.setattr(dc, "device_budget_bytes", lambda device: (est["nano"] + both["nano"]) // 2)
    calls.clear()
    res = dc._stage(lambda out: dc.run_perf_stage("cpu", p, float("inf"), True, lambda m: None, out))
    assert calls == [("nano", False, False), ("nano", True, False)]  # nano alone fits, not beside its comparison
    assert [r["run"] for r in res["comparison_skipped"]] == ["nano"]
    assert res["presets"][0]["step_time_unchunked_s"] is None
    md = dc.markdown({"device_name": "test", "created_at": "2026-12-04", "wall_s": 1.0, "quick": True,
                      "stages": {"tests": {"ok": True}, "perf": res, "packed": {"ok": True, "rows": []}}})
    assert "| `nano` | 10.0 | 12,800 | 30% | 0.0 | – | n/a |" in md and "- not run (memory): micro:" in md


def test_a_check_stopped_mid_stage_leaves_the_rows_it_measured(monkeypatch):
    """The JSON is saved after each perf row, marked as stopped mid-stage until the stage ends."""
    from bench import device_check as dc, perf

    monkeypatch.setattr(dc, "run_tests", lambda *a, **k: {"tests": 1, "passed": 1, "failed": [], "skipped": []})
    monkeypatch.setattr(perf, "run_perf", _fake_perf([]))
    monkeypatch.setattr(dc, "run_packed_stage", lambda *a, **k: {"rows": []})
    saved = []
    dc.check("cpu", True, None, save=lambda r: saved.append(json.loads(json.dumps(r, default=str))), log=lambda m: None)
    mid = [s["stages"]["perf"] for s in saved if "stopped mid-stage" in s["stages"]["perf"].get("error", "")]
    assert [[r["preset"] for r in m["presets"] + m["compiled"]] for m in mid] == [["nano"], ["nano", "micro"],
                                                                               ["nano", "micro", "nano"]]
    assert not any(m["ok"] for m in mid) and saved[-1]["stages"]["perf"]["ok"]


def test_packs_that_would_not_fit_the_gpu_are_skipped_and_the_others_measured(monkeypatch):
    from bench import device_check as dc
    from bench.config import from_dict
    from bench.memory import estimate_step_bytes

    p = dc.plan("cpu", True)
    member = from_dict(dict(model=p["pack_preset"], vocab_size=p["vocab_size"], seq_len=p["seq_len"],
                            batch_size=p["batch_size"], device="cpu", precision=p["precision"])).check()
    monkeypatch.setattr(dc, "device_budget_bytes", lambda device: 3 * estimate_step_bytes(member))  # K = 2, not 4
    p["pack_small"] = [p["batch_size"], p["seq_len"]]  # the same members in the small rows: the same budget
    res = dc._stage(lambda out: dc.run_packed_stage("cpu", p, float("inf"), out))
    assert res["ok"] and [r["k"] for r in res["rows"]] == [2, 4]
    assert res["rows"][0]["factor"] > 0 and "memory" in res["rows"][1]["skipped"]
    assert "factor" in res["small"]["rows"][0] and "skipped" in res["small"]["rows"][1]
    assert dc.targets({"perf": {}, "packed": res})["packed_factor_16M"]["measured"] == res["rows"][0]["factor"]
