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
