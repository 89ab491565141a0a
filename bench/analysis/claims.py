"""The reference study's claims, tested on a results directory: tables and one verdict per claim.

Claims (Stollenwerk et al., arXiv 2601.02031), as README "Does it reproduce?" states them:

(a) μ-centering and μ-loss have a lower LR sensitivity (LRS) than the baseline;
(b) ... lower than z-loss;
(c) ... on par with soft-capping;
(d) (a)–(c) also hold with weight tying;
(e) μ-loss is less sensitive to λ than z-loss.

Evidence for (a)–(d) is the paired difference of per-seed LRS, ΔLRS = LRS(μ-method) −
LRS(reference), over every (model, seed) pair that both ran (seeds are paired: same
initialization and data order). A difference is *significant* when the exact two-sided
sign-flip test gives p < 0.05 (with 3 seeds × 2 models = 6 pairs, the smallest possible p is
1/32). Verdicts:

- lower-than claims: ``supported`` (ΔLRS < 0, significant), ``contradicted`` (ΔLRS > 0,
  significant), else ``not shown``;
- on-par claim (an equivalence question): ``supported`` when the 95 % bootstrap CI of the mean
  ΔLRS lies within ±``PAR_MARGIN`` nats (a significant but smaller difference is still "on
  par"), ``contradicted`` when the CI lies entirely outside that band, else ``inconclusive``.

A claim's verdict combines its two methods': ``supported`` / ``contradicted`` when both are,
``mixed`` when one is contradicted, ``partly supported`` when one is supported and none
contradicted, else ``not shown``.

(e) compares, per seed, the spread of LRS over the λ grid (max − min) of μ-loss and of z-loss:
``supported`` when μ-loss's spread is smaller for every seed (with 3 seeds a sign-flip
p-value cannot go below 0.25, so consistency across seeds is the criterion, stated as such),
``contradicted`` when it is larger for every seed, else ``not shown``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from .metrics import lambda_sensitivity, lrs_table
from .results import model_order, prepare_runs, setting_order, stabilizer_label
from .stats import bootstrap_ci, paired_signflip_test, seed_summary
from .tables import fmt, to_markdown

ALPHA = 0.05
PAR_MARGIN = 0.1  # nats: "on par" means the CI of ΔLRS lies within ±0.1
MU_METHODS = ("mucentering", "muloss")


@dataclass
class Comparison:
    """ΔLRS = LRS(method) − LRS(reference) over paired (model, seed) points."""

    method: str
    reference: str
    tied: bool
    n_pairs: int
    diff: float
    ci: tuple[float, float]
    p: float

    @property
    def significant(self) -> bool:
        return not math.isnan(self.p) and self.p < ALPHA


def compare(per_seed: pd.DataFrame, method: str, reference: str, tied: bool) -> Comparison:
    """Paired ΔLRS of ``method`` vs ``reference`` (each at its single hyperparameter setting).

    per_seed: ``lrs_table(runs, by_seed=True)``; a stabilizer with several settings (a λ grid)
    uses its first (smallest) one.
    """
    g = per_seed[per_seed["weight_tying"] == tied]

    def side(stab: str) -> pd.Series:
        s = g[g["stabilizer"] == stab]
        if s.empty:
            return pd.Series(dtype=float)
        s = s[s["hp"] == sorted(s["hp"].unique())[0]]
        return s.set_index(["model", "seed"])["lrs"]

    a, b = side(method), side(reference)
    idx = a.index.intersection(b.index) if not (a.empty or b.empty) else []
    if len(idx) == 0:
        return Comparison(method, reference, tied, 0, math.nan, (math.nan, math.nan), math.nan)
    d = (a.loc[idx] - b.loc[idx]).to_numpy(dtype=float)
    return Comparison(method, reference, tied, len(idx), float(d.mean()), bootstrap_ci(d),
                      paired_signflip_test(a.loc[idx], b.loc[idx]) if len(d) >= 2 else math.nan)


def lower_verdict(c: Comparison) -> str:
    if c.n_pairs < 2:
        return "no data"
    if c.significant:
        return "supported" if c.diff < 0 else "contradicted"
    return "not shown"


def par_verdict(c: Comparison) -> str:
    if c.n_pairs < 2:
        return "no data"
    lo, hi = c.ci
    if -PAR_MARGIN <= lo and hi <= PAR_MARGIN:
        return "supported"
    return "contradicted" if lo > PAR_MARGIN or hi < -PAR_MARGIN else "inconclusive"


def _overall(verdicts: list[str]) -> str:
    """One claim's verdict from its per-method verdicts (μ-centering, μ-loss)."""
    if "contradicted" in verdicts:
        return "contradicted" if all(v == "contradicted" for v in verdicts) else "mixed"
    if verdicts and all(v == "supported" for v in verdicts):
        return "supported"
    if "supported" in verdicts:
        return "partly supported"
    return "no data" if all(v == "no data" for v in verdicts) else "not shown"


def _evidence(c: Comparison) -> str:
    if c.n_pairs < 2:
        return f"{stabilizer_label(c.method)} vs {stabilizer_label(c.reference)}: fewer than 2 pairs"
    lo, hi = c.ci
    return (f"{stabilizer_label(c.method)} − {stabilizer_label(c.reference)}: ΔLRS {c.diff:+.3f} "
            f"[{lo:+.3f}, {hi:+.3f}], p = {c.p:.3g}, {c.n_pairs} pairs")


SPREAD_KEYS = ["model", "weight_tying", "precision", "seed"]


def lambda_spreads(runs: pd.DataFrame) -> pd.DataFrame:
    """``metrics.lambda_sensitivity`` of each seed's runs, for λ (``hp_name == "lam"``): one row
    per model × stabilizer × weight tying × precision × seed, with ``lrs_spread`` = max − min LRS
    over the λ grid."""
    runs = prepare_runs(runs)
    per_seed = [lambda_sensitivity(g).assign(seed=seed) for seed, g in runs.groupby("seed")]
    out = pd.concat(per_seed, ignore_index=True) if per_seed else lambda_sensitivity(runs).assign(seed=0)
    return out[out["hp_name"] == "lam"]


def lambda_verdict(lam_runs: pd.DataFrame | None) -> tuple[str, str]:
    """(verdict, evidence) for claim (e)."""
    if lam_runs is None or lam_runs.empty:
        return "no data", "no λ sweep given"
    s = lambda_spreads(lam_runs)
    mu = s[s["stabilizer"] == "muloss"].set_index(SPREAD_KEYS)["lrs_spread"]
    z = s[s["stabilizer"] == "zloss"].set_index(SPREAD_KEYS)["lrs_spread"]
    idx = mu.index.intersection(z.index)
    if len(idx) == 0:
        return "no data", "the λ sweep lacks μ-loss or z-loss over ≥ 2 values of λ"
    d = (mu.loc[idx] - z.loc[idx]).to_numpy()
    verdict = "supported" if (d < 0).all() else ("contradicted" if (d > 0).all() else "not shown")
    p = paired_signflip_test(mu.loc[idx], z.loc[idx]) if len(idx) >= 2 else math.nan
    evidence = (f"LRS spread over λ: μ-loss {mu.loc[idx].mean():.3f} vs z-loss {z.loc[idx].mean():.3f} nats "
                f"(mean of {len(idx)} seed(s)); μ-loss smaller in {(d < 0).sum()}/{len(idx)}, p = {p:.3g}")
    return verdict, evidence


def claims_table(runs: pd.DataFrame, lam_runs: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per claim: ``claim``, ``verdict``, ``evidence`` (text)."""
    per_seed = lrs_table(runs, by_seed=True)
    rows = []
    for tied, prefix in ((False, ""), (True, "(d) tied: ")):
        for ref, label, rule in (("baseline", "(a) lower LRS than the baseline", lower_verdict),
                                 ("zloss", "(b) lower LRS than z-loss", lower_verdict),
                                 ("softcap", "(c) LRS on par with soft-capping", par_verdict)):
            cs = [compare(per_seed, m, ref, tied) for m in MU_METHODS]
            name = (prefix + label[4:]) if tied else label
            rows.append({"claim": name, "verdict": _overall([rule(c) for c in cs]),
                         "evidence": "; ".join(f"{_evidence(c)} ({rule(c)})" for c in cs)})
    verdict, evidence = lambda_verdict(lam_runs)
    rows.append({"claim": "(e) μ-loss less sensitive to λ than z-loss", "verdict": verdict, "evidence": evidence})
    return pd.DataFrame(rows)


def lrs_by_model(runs: pd.DataFrame, with_ci: bool = True) -> pd.DataFrame:
    """A row per setting (untied first), a column per model: mean LRS over seeds [95 % bootstrap CI]."""
    runs = prepare_runs(runs)
    cells: dict[tuple[str, str], str] = {}
    for r in seed_summary(lrs_table(runs, by_seed=True), metrics=("lrs",)).itertuples(index=False):
        ci = f" [{fmt(r.lrs_ci_lo)}, {fmt(r.lrs_ci_hi)}]" if with_ci and not math.isnan(r.lrs_ci_lo) else ""
        cells[(r.setting, r.model)] = f"{fmt(r.lrs_mean)}{ci}"
    models = model_order(runs)
    out = [{"setting": s, **{m: cells.get((s, m), "") for m in models}} for s in setting_order(runs)]
    return pd.DataFrame(out)


def by_lr_table(runs: pd.DataFrame, model: str | None = None, value: str = "final_loss") -> pd.DataFrame:
    """A row per setting, a column per learning rate: mean of ``value`` over seeds (final loss,
    ‖μ‖, cos(μ, h̄), …), ``†k`` when k of the seeds diverged (included in the mean)."""
    runs = prepare_runs(runs)
    if model is not None:
        runs = runs[runs["model"] == model]
    cells = {}
    for (setting, lr), g in runs.groupby(["setting", "lr"]):
        k = int(g["diverged"].sum())
        cells[(setting, lr)] = f"{fmt(float(pd.to_numeric(g[value]).mean()))}{f' †{k}' if k else ''}"
    lrs = sorted(runs["lr"].unique())
    out = [{"setting": s, **{f"{lr:g}": cells.get((s, lr), "") for lr in lrs}} for s in setting_order(runs)]
    return pd.DataFrame(out)


DIAGNOSTICS = (("logit_mean", "mean logit"), ("mu_norm", "‖μ‖"), ("mean_log2z", "mean (log Z)²"))
"""Final-checkpoint statistics the study published (``oec_paper_diagnostics.csv``) and stabench records."""


def published_beside_local(runs: pd.DataFrame, published: pd.DataFrame, value: str) -> pd.DataFrame | None:
    """A row per (source, setting), a column per learning rate: ``value`` of the study's smallest
    model beside ours (our largest), for the settings both have; None when ``published`` lacks it."""
    if value not in published.columns or value not in runs.columns:
        return None
    runs, pub = prepare_runs(runs), prepare_runs(published)
    pub = pub[pd.to_numeric(pub[value], errors="coerce").notna()]
    if pub.empty:
        return None
    local_model, pub_model = model_order(runs)[-1], model_order(pub)[0]
    both = set(zip(runs["stabilizer"], runs["hp"], runs["weight_tying"])) & \
        set(zip(pub["stabilizer"], pub["hp"], pub["weight_tying"]))
    if not both:
        return None

    def rows(df: pd.DataFrame, model: str, source: str) -> pd.DataFrame:
        shared = pd.Series([t in both for t in zip(df["stabilizer"], df["hp"], df["weight_tying"])], index=df.index)
        df = df[(df["model"] == model) & shared]
        t = by_lr_table(df, value=value)
        t.insert(0, "source", f"{model} ({source})")
        return t

    out = pd.concat([rows(pub, pub_model, "published"), rows(runs, local_model, "ours")], ignore_index=True)
    lr_cols = sorted((c for c in out.columns if c not in ("source", "setting")), key=float)
    return out[["source", "setting", *lr_cols]].fillna("")


def restrict_lr(runs: pd.DataFrame | None, lr_max: float | None) -> pd.DataFrame | None:
    """Runs with lr ≤ ``lr_max`` (all runs for None): LRS on a sub-grid, e.g. the study's (≤ 0.3)."""
    if runs is None or lr_max is None:
        return runs
    return runs[runs["lr"] <= lr_max * (1 + 1e-9)]


def markdown(runs: pd.DataFrame, lam_runs: pd.DataFrame | None = None,
             published: pd.DataFrame | None = None, lr_max: float | None = None) -> str:
    """The "Does it reproduce?" tables and verdicts as Markdown (on lr ≤ ``lr_max`` if given)."""
    runs, lam_runs = restrict_lr(runs, lr_max), restrict_lr(lam_runs, lr_max)
    grid = sorted(runs["lr"].unique())
    parts = [f"Learning-rate grid: {', '.join(f'{x:g}' for x in grid)} ({len(grid)} points).", ""]
    if published is not None:
        parts += ["Published LRS (nats; computed by stabench from the study's final losses, untied):", "",
                  to_markdown(lrs_by_model(published, with_ci=False)), ""]
    parts += ["CPU-scale LRS (nats; mean over seeds [95 % bootstrap CI]):", "", to_markdown(lrs_by_model(runs)), ""]
    models = model_order(prepare_runs(runs))
    for model in models:
        parts += [f"Final validation loss, `{model}` (nats; mean over seeds; †k: k seeds diverged):", "",
                  to_markdown(by_lr_table(runs, model)), ""]
    for value, what in (("mu_norm", "‖μ‖ at the end of training"),
                        ("mu_hidden_cos", "cos(μ, mean final hidden state) at the end of training"),
                        ("logit_precision_error", "max |logits − fp32 logits| on a fixed batch (the run's precision)")):
        if value in runs.columns:
            parts += [f"{what}, `{models[-1]}` (mean over seeds):", "", to_markdown(by_lr_table(runs, models[-1], value)),
                      ""]
    for value, what in DIAGNOSTICS if published is not None else ():
        table = published_beside_local(runs, published, value)
        if table is not None:
            parts += [f"{what} at the end of training per learning rate: the study's (published, its bf16 evaluation) "
                      "beside ours (mean over seeds):", "", to_markdown(table), ""]
    if lam_runs is not None and not lam_runs.empty:
        parts += ["CPU-scale LRS per λ (nats; mean over seeds [95 % bootstrap CI]):", "",
                  to_markdown(lrs_by_model(lam_runs)), ""]
    parts += ["Verdicts:", "", to_markdown(claims_table(runs, lam_runs)), ""]
    fp32 = _fp32_runs(runs)
    if fp32 is not None:
        lam32 = _fp32_runs(lam_runs) if lam_runs is not None else None
        parts += ["The same, on the final losses re-evaluated in fp32 (`final_loss_fp32`: the same weights and "
                  "batches without the run's bf16 rounding):", "",
                  "CPU-scale LRS, fp32 evaluation (nats; mean over seeds [95 % bootstrap CI]):", "",
                  to_markdown(lrs_by_model(fp32)), "",
                  "Verdicts, fp32 evaluation:", "", to_markdown(claims_table(fp32, lam32)), ""]
    return "\n".join(parts)


def _fp32_runs(runs: pd.DataFrame | None) -> pd.DataFrame | None:
    """``runs`` scored by ``final_loss_fp32`` when they carry it and it differs somewhere (a bf16 or
    bf16-emu run); None otherwise (fp32 runs: the two losses are one)."""
    from .results import use_loss

    if runs is None or "final_loss_fp32" not in runs.columns or "final_loss_run_precision" in runs.columns:
        return None  # no fp32 losses, or the runs are scored by them already (--loss final_loss_fp32)
    fp32 = pd.to_numeric(runs["final_loss_fp32"], errors="coerce")
    if fp32.isna().all() or (fp32 == pd.to_numeric(runs["final_loss"])).all():
        return None
    return use_loss(runs, "final_loss_fp32")
