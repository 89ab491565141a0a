"""LaTeX tables: every ``.tex`` the suite writes is pure ASCII and compiles with pdflatex.

Three sets of tables are checked: those of a planted runs frame that fills every table of
``TABLES`` (two models, a λ grid, seeds, diverged runs, step times), those of the published
results (``--compare``; when the CSV is present) and the committed ``results/*/figures/*.tex``.
Each set is wrapped in one minimal document (article + booktabs) and compiled with
``pdflatex -halt-on-error``. Without pdflatex the compile test is skipped with the install
command, except in CI (``CI=true``), where it fails: CI (``.ci/run``) installs TeX first.
"""
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from bench.analysis.external import read_published
from bench.analysis.tables import TABLES, latex_escape, to_latex, write_tables

ROOT = Path(__file__).parents[1]
CSV = ROOT.parent / "shared/data/oec_paper_runs.csv"
COMMITTED = sorted(ROOT.glob("results/*/figures/*.tex"))
INSTALL = ("apt-get install -y --no-install-recommends texlive-latex-base texlive-latex-recommended "
           "(booktabs is in texlive-latex-recommended)")


def planted_runs() -> pd.DataFrame:
    """Every table has rows: 2 models × (baseline, z-loss at two λ, soft-cap) × 3 lrs × 2 seeds."""
    rows = []
    for model, n_params in (("nano", 30_000), ("micro", 120_000)):
        for stab, hp in (("baseline", {}), ("zloss", {"lam": 1e-4}), ("zloss", {"lam": 0.1}), ("softcap", {"cap": 30.0})):
            for lr, loss in ((1e-3, 3.2), (1e-2, 2.9), (1.0, math.nan)):
                for seed in (1, 2):
                    rows.append({"model": model, "n_params": n_params, "vocab_size": 256, "L0": math.log(256),
                                 "stabilizer": stab, "lam": hp.get("lam"), "cap": hp.get("cap"),
                                 "hparams": json.dumps(hp), "lr": lr, "seed": seed, "weight_tying": False,
                                 "final_loss": loss + 0.01 * seed, "diverged": lr == 1.0,
                                 "step_time_s": 0.01 + 0.001 * len(hp) + 0.0001 * seed})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def emitted(tmp_path_factory) -> dict[str, list[Path]]:
    """The .tex files of each set (name → paths)."""
    out = tmp_path_factory.mktemp("tables")
    sets = {"planted": [p for p in write_tables(planted_runs(), out / "planted") if p.suffix == ".tex"]}
    if CSV.is_file():
        sets["published"] = [p for p in write_tables(read_published(CSV), out / "published", suffix="_published")
                             if p.suffix == ".tex"]
    for d in sorted({p.parent for p in COMMITTED}):
        sets[str(d.relative_to(ROOT))] = [p for p in COMMITTED if p.parent == d]
    return sets


def test_the_planted_runs_fill_every_table(emitted):
    assert {p.stem for p in emitted["planted"]} == {t.name for t in TABLES}


def test_latex_escape_is_ascii_for_every_character_the_suite_writes():
    sources = "".join(p.read_text(encoding="utf-8") for p in (ROOT / "bench" / "analysis").glob("*.py"))
    chars = sorted({c for c in sources if not c.isascii()})
    assert "λ" in chars and "α" in chars
    for c in chars + ["é", "☃", "\u00a0"]:
        assert latex_escape(f"a{c}b").isascii(), c
    assert latex_escape("α = 0.05") == r"$\alpha$ = 0.05"
    assert latex_escape("‖μ‖") == r"$\|\mu\|$"  # one math group, never `$$` (display math)
    assert latex_escape("0.1–0.3 × 2") == r"0.1--0.3 $\times$ 2"
    assert latex_escape("|x| < 3") == r"\textbar{}x\textbar{} \textless{} 3"


def test_every_emitted_table_is_pure_ascii(emitted):
    for paths in emitted.values():
        for p in paths:
            text = p.read_text(encoding="utf-8")
            bad = sorted({c for c in text if not c.isascii()})
            assert not bad, f"{p}: non-ASCII {bad}"


def _pdflatex() -> str:
    exe = shutil.which("pdflatex")
    if exe is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"pdflatex not found in CI (CI=true); .ci/run installs it: {INSTALL}")
        pytest.skip(f"pdflatex not found; install it to run this test: {INSTALL}")
    return exe


def test_every_emitted_table_compiles_with_pdflatex(emitted, tmp_path):
    exe = _pdflatex()
    for name, paths in emitted.items():
        assert paths, name
        doc = tmp_path / (re.sub(r"\W", "_", name) + ".tex")
        body = "\n".join(rf"\input{{{p.as_posix()}}}\clearpage" for p in paths)
        doc.write_text("\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n"
                       f"{body}\n\\end{{document}}\n")
        proc = subprocess.run([exe, "-halt-on-error", "-interaction=nonstopmode", "-no-shell-escape", doc.name],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
        log = (tmp_path / doc.with_suffix(".log").name).read_text(errors="replace")
        errors = [m.group(0) for m in re.finditer(r"^!.*(?:\n.*){0,3}", log, re.M)]
        first = log.find("\n!")
        opened = re.findall(r"\(([^()\s]+\.tex)", log[:first]) if first >= 0 else []
        where = f" in {opened[-1]}" if opened else ""
        assert proc.returncode == 0, (f"{name}: pdflatex failed{where}:\n"
                                      + "\n".join(errors or [proc.stdout[-2000:]]))
        assert doc.with_suffix(".pdf").is_file()


def test_latex_table_of_awkward_cells_compiles(tmp_path):
    df = pd.DataFrame({"stabilizer": ["zloss (λ=1e-4)", "my_mod:Stab#2", "a & b"], "Δ ± σ": ["1 ± 2", "50 %", "~^\\"],
                       "note": ["‖μ‖ ≥ 3 → ok", "p < 0.05 | α", "×10⁻⁶ — …"]})
    tex = to_latex(df, caption="LRS: λ ∈ {1e-7, 0.1}; α = 0.05", label="tab:x")
    assert tex.isascii()
    exe = _pdflatex()
    (tmp_path / "t.tex").write_text("\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n"
                                    + tex + "\\end{document}\n")
    proc = subprocess.run([exe, "-halt-on-error", "-interaction=nonstopmode", "t.tex"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
