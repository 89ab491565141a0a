"""Figures, tables, report, leaderboard and notebooks, made from REAL tiny training runs.

Two results directories are trained once per session with bench.trainer.train and written with
bench.records.write_run:
- ``full``: nano and micro × baseline, z-loss and μ-loss (λ ∈ {1e-4, 0.1}) × lr ∈ {1e-3, 1e-2, 10}
  × seeds {1, 2}; lr = 10 diverges;
- ``minimal``: one model, one seed, no diverged run, no λ grid (the figures that need those are
  skipped with a note, nothing crashes).
"""
import base64
import importlib.util
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from bench import cli
from bench.analysis.figures import FIGURES, PUBLISHED_FIGURES
from bench.analysis.tables import TABLES
from bench.config import from_dict
from bench.records import merge_parts, write_run
from bench.trainer import train

ROOT = Path(__file__).parents[1]
NOTEBOOKS = sorted((ROOT / "analysis").glob("*.ipynb"))
CSV = ROOT.parent / "shared/data/oec_paper_runs.csv"
PNG, PDF = b"\x89PNG\r\n\x1a\n", b"%PDF-"

TINY = dict(vocab_size=256, seq_len=32, batch_size=4, steps=30, warmup=5, eval_every=10, eval_batches=2,
            log_every=5, data="synthetic:tokens=50000", threads=1)


def _train_grid(out: Path, sweep: str, models, settings, lrs, seeds) -> Path:
    for model in models:
        for stabilizer, hparams in settings:
            for lr in lrs:
                for seed in seeds:
                    cfg = from_dict({**TINY, "sweep": sweep, "model": model, "stabilizer": stabilizer,
                                     "hparams": hparams, "lr": lr, "seed": seed}).check()
                    result = train(cfg)
                    write_run(out, result.run, result.curve, merge=False)
    merge_parts(out)
    return out


@pytest.fixture(scope="session")
def full(tmp_path_factory) -> Path:
    settings = [("baseline", {}), ("zloss", {"lam": 1e-4}), ("zloss", {"lam": 0.1}),
                ("muloss", {"lam": 1e-4}), ("muloss", {"lam": 0.1})]
    return _train_grid(tmp_path_factory.mktemp("full"), "tiny-full", ("nano", "micro"), settings,
                       (1e-3, 1e-2, 10.0), (1, 2))


@pytest.fixture(scope="session")
def minimal(tmp_path_factory) -> Path:
    out = _train_grid(tmp_path_factory.mktemp("minimal"), "tiny-minimal", ("nano",),
                      [("baseline", {}), ("zloss", {"lam": 1e-4})], (1e-3, 1e-2), (1,))
    (out / "sweep.toml").write_text('name = "tiny-minimal"\nlr = [1e-3, 1e-2]\n')
    return out


def _check_file(path: Path) -> None:
    data = path.read_bytes()
    assert data, f"{path} is empty"
    if path.suffix == ".png":
        assert data.startswith(PNG), path
    elif path.suffix == ".pdf":
        assert data.startswith(PDF), path
    elif path.suffix == ".md":
        assert data.startswith(b"**") and b"|---|" in data, path
    elif path.suffix == ".tex":
        assert data.startswith(rb"\begin{table}") and data.rstrip().endswith(rb"\end{table}"), path


def _written(stdout: str) -> set[Path]:
    return {Path(line[len("wrote "):]) for line in stdout.splitlines() if line.startswith("wrote ")}


def test_the_full_fixture_is_a_real_sweep(full):
    from bench.analysis.results import load_results

    runs = load_results(full).runs
    assert len(runs) == 2 * 5 * 3 * 2
    assert runs.loc[runs["lr"] == 10.0, "failed"].all() and not runs.loc[runs["lr"] < 1, "failed"].any()


def test_figures_writes_every_promised_file(full, tmp_path, capsys):
    """Every figure and table the registries promise, as non-empty PNG / PDF / Markdown / LaTeX."""
    out = tmp_path / "figs"
    assert cli.main(["figures", str(full), "--figures", str(out)]) == 0
    stdout = capsys.readouterr().out
    expected = {out / f"{spec.name}.{ext}" for spec in FIGURES for ext in ("png", "pdf")}
    expected |= {out / f"{spec.name}.{ext}" for spec in TABLES for ext in ("md", "tex")}
    assert _written(stdout) == expected and "skipped" not in stdout
    assert set(out.iterdir()) == expected
    for path in expected:
        _check_file(path)
    assert "ΔLRS vs baseline" in (out / "sensitivity.md").read_text()


@pytest.fixture(scope="session")
def published_subset(tmp_path_factory) -> Path:
    """Published rows of two sizes, baseline and z-loss at two λ (small, so its figures draw fast)."""
    if not CSV.is_file():
        pytest.skip(f"published results not found at {CSV}")
    lines = CSV.read_text().splitlines()
    keep = [line for line in lines[1:] if line.split(",")[0] in ("16M", "29M")
            and line.split(",")[1] in ("baseline", "zloss") and line.split(",")[2] in ("0.0", "0.0001", "0.1")]
    path = tmp_path_factory.mktemp("published") / "published.csv"
    path.write_text("\n".join([lines[0], *keep]) + "\n")
    return path


def test_a_minimal_sweep_skips_what_it_cannot_show_and_compares_with_published(minimal, published_subset,
                                                                                capsys):
    out = minimal / "figures"  # the default
    out.mkdir()
    (out / "lambda_sensitivity.png").write_bytes(PNG)  # left by an earlier run: removed, it would mislead
    assert cli.main(["figures", str(minimal), "--compare", str(published_subset)]) == 0
    stdout = capsys.readouterr().out
    assert f"removed stale {out / 'lambda_sensitivity.png'}" in stdout
    for name, why in (("lambda_sensitivity", "hyperparameter"), ("diverging_curves", "no run diverged")):
        assert re.search(rf"note: figure {name} skipped: .*{why}", stdout), stdout
    written = _written(stdout)
    # one local model size, but the published sizes make LRS-vs-size drawable
    for name in ("loss_vs_lr", "lrs_vs_size", "divergence_map", "logits_vs_lr", "mu_norm_vs_lr",
                 *(s.name for s in PUBLISHED_FIGURES)):
        assert {out / f"{name}.png", out / f"{name}.pdf"} <= written, name
    assert {out / "sensitivity_published.md", out / "lambda_sensitivity_published.tex"} <= written
    assert out / "lambda_sensitivity.md" not in written  # no λ grid locally
    assert set(out.iterdir()) == written
    for path in written:
        _check_file(path)


def _check_html(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    ids = set(re.findall(r'id="([^"]+)"', text))
    for href in re.findall(r'href="([^"]*)"', text):
        assert href.startswith("#") and href[1:] in ids, f"broken or external link {href!r}"
    srcs = re.findall(r'src="([^"]*)"', text)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    for s in srcs:
        assert base64.b64decode(s.split(",", 1)[1]).startswith(PNG)
    return text


@pytest.fixture(scope="session")
def full_report(full) -> Path:
    assert cli.main(["report", str(full)]) == 0
    return full / "report.html"


def test_report_is_one_self_contained_html_file(full_report):
    text = _check_html(full_report)
    assert text.count("<img ") == len(FIGURES)  # every figure drawable for this sweep
    for needle in ("stabench version", "0.1.0", "git commit", "torch version", "tiny-full",
                   "LR sensitivity, best loss and best learning rate", "Hyperparameter (λ) sensitivity",
                   "Step-time overhead", "Run configuration"):
        assert needle in text, needle


def test_report_of_a_minimal_sweep_notes_skipped_figures_and_shows_the_sweep_file(minimal, tmp_path, capsys):
    out = tmp_path / "r" / "report.html"
    assert cli.main(["report", str(minimal), "--html", str(out)]) == 0
    capsys.readouterr()
    text = _check_html(out)
    assert "not drawn: no run diverged" in text and "lrs_vs_size</b> not drawn" in text
    assert 'name = &quot;tiny-minimal&quot;' in text  # sweep.toml shown
    import hashlib
    assert hashlib.sha256((minimal / "sweep.toml").read_bytes()).hexdigest() in text


def test_leaderboard_ranks_per_protocol_with_provenance_on_every_row(full, minimal, tmp_path, capsys):
    out = tmp_path / "board.md"
    assert cli.main(["leaderboard", str(full), str(minimal), str(full), "--markdown", str(out)]) == 0
    stdout = capsys.readouterr().out
    text = out.read_text()
    assert text in stdout
    assert text.count("## Protocol ") == 2  # different lr grids and models: never ranked together
    rows = [line for line in text.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) == 3 + 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        seeds, n_runs, version, sweep_hash = cells[-4:]
        assert version == "0.1.0" and n_runs.isdigit() and re.fullmatch(r"\d+(,\d+)*", seeds), row
        assert sweep_hash == "–" or re.fullmatch(r"[0-9a-f]{12}", sweep_hash), row
    assert "| 1 | " in text and "zloss" in text


@pytest.mark.skipif(not CSV.is_file(), reason=f"published results not found at {CSV}")
def test_claims_writes_published_and_local_tables_and_a_verdict_per_claim(full, tmp_path, capsys):
    out = tmp_path / "claims.md"
    assert cli.main(["claims", str(full), "--lambda", str(full), "--compare", str(CSV), "--markdown", str(out)]) == 0
    text = out.read_text()
    assert text in capsys.readouterr().out
    assert "Published LRS" in text and "| 221M |" in text
    assert "CPU-scale LRS" in text and "micro" in text
    pattern = r"^\| \((\w)\) .*? \| (supported|contradicted|not shown|mixed|partly supported|inconclusive|no data) \|"
    own, _, fp32 = text.partition("re-evaluated in fp32")
    verdicts = re.findall(pattern, own, re.M)
    assert [c for c, _ in verdicts] == ["a", "b", "c", "d", "d", "d", "e"]
    if fp32:  # bf16-emu runs: the same verdicts once more, on the fp32 re-evaluation
        assert [c for c, _ in re.findall(pattern, fp32, re.M)] == ["a", "b", "c", "d", "d", "d", "e"]
    # the fixture has no soft-capping or mu-centering runs: what it cannot judge says so
    assert dict(verdicts)["c"] == "no data"


def test_bad_input_is_one_error_line_and_exit_2(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "missing")]) == 2
    (tmp_path / "empty").mkdir()
    assert cli.main(["leaderboard", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("stabench ") and "error:" in line for line in err)


def test_bad_published_csv_is_a_usage_error(minimal, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("model,lr\n16M,0.1\n")
    assert cli.main(["figures", str(minimal), "--figures", str(tmp_path / "f"), "--compare", str(bad)]) == 2
    assert "missing column(s) stabilizer, lam, weight_tying, final_loss" in capsys.readouterr().err
    assert not (tmp_path / "f").exists()


# -- notebooks ------------------------------------------------------------------------------

def test_notebooks_are_stored_without_outputs():
    nbformat = pytest.importorskip("nbformat")
    assert {p.name for p in NOTEBOOKS} == {"sensitivity.ipynb", "stability.ipynb", "lambda_sensitivity.ipynb"}
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, path.name


NOTEBOOK_FIGURES = {"sensitivity.ipynb": {"loss_vs_lr", "lrs_vs_size"},
                    "stability.ipynb": {"divergence_map", "diverging_curves", "logits_vs_lr", "mu_norm_vs_lr"},
                    "lambda_sensitivity.ipynb": {"lambda_sensitivity"}}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes_headlessly(path, full, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("STABENCH_RESULTS", str(full))
    monkeypatch.setenv("STABENCH_FIGURES", str(tmp_path / "figs"))
    monkeypatch.delenv("STABENCH_COMPARE", raising=False)
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) == len(NOTEBOOK_FIGURES[path.name])
    for name in NOTEBOOK_FIGURES[path.name]:  # the same files `stabench figures` writes
        _check_file(tmp_path / "figs" / f"{name}.png")
        _check_file(tmp_path / "figs" / f"{name}.pdf")


def _readme_notebook_command() -> str:
    """The README's line that runs a notebook headlessly (`STABENCH_RESULTS=… jupyter execute …`)."""
    lines = [line.strip() for line in (ROOT / "README.md").read_text().splitlines()
             if line.strip().startswith("STABENCH_RESULTS=") and "jupyter execute" in line]
    assert len(lines) == 1, lines
    return lines[0]


def test_readme_notebook_command_resolves_results_from_the_launch_directory(full, tmp_path):
    """Run the README's command verbatim from a directory holding its relative results path: the kernel
    runs in analysis/, yet $STABENCH_RESULTS resolves against the launch directory."""
    jupyter = Path(sys.executable).parent / "jupyter"
    if not jupyter.exists() or importlib.util.find_spec("nbclient") is None:
        from services import missing
        missing("jupyter execute (nbclient)", "pip install -e '.[notebooks]'", "STABENCH_REQUIRE_NOTEBOOKS")
    command = _readme_notebook_command()
    relative = re.match(r"STABENCH_RESULTS=(\S+) ", command).group(1)
    notebook = command.split()[-1]
    assert not Path(relative).is_absolute() and notebook.startswith("analysis/")
    launch = tmp_path / "launch"
    shutil.copytree(full, launch / relative)
    (launch / "analysis").symlink_to(ROOT / "analysis")  # the notebook path as the README writes it
    env = {k: v for k, v in os.environ.items() if not k.startswith("STABENCH_") and k != "PWD"}
    env["PATH"] = f"{jupyter.parent}{os.pathsep}{env.get('PATH', '')}"
    r = subprocess.run(["bash", "-c", command], cwd=launch, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    before = {p.name for p in NOTEBOOKS}
    for name in NOTEBOOK_FIGURES[Path(notebook).name]:  # saved in <results>/figures, under the launch dir
        _check_file(launch / relative / "figures" / f"{name}.png")
    assert {p.name for p in NOTEBOOKS} == before
    nb = (ROOT / notebook).read_text()
    assert '"outputs": []' in nb and '"output_type"' not in nb  # the stored file is left unchanged


# -- a real browser -------------------------------------------------------------------------

def test_report_renders_in_headless_chromium(full_report, tmp_path):
    from services import chromium

    CHROMIUM = chromium()  # in CI a missing browser fails this test; elsewhere it skips saying how to get one
    report = full_report
    shot = tmp_path / "shot.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1280,4000",
                        report.as_uri()], capture_output=True, timeout=180, check=False,
                       env={**os.environ, "HOME": profile})
    assert shot.is_file() and shot.read_bytes().startswith(PNG)
    import matplotlib.image
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (4000, 1280)
    # figures and tables fill the page: many rows are not plain white and colours vary
    nonwhite_rows = (pixels.min(axis=(1, 2)) < 0.9).mean()
    assert nonwhite_rows > 0.5 and pixels.std() > 0.05 and not math.isnan(float(pixels.std()))
