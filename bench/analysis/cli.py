"""``stabench figures``, ``report``, ``leaderboard``, ``claims``, ``compare``, ``precision-tax`` and ``regime``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


COMPARE_HELP = ("published results CSV with columns model, stabilizer, lam, lr, weight_tying, final_loss, "
                "tabulated and drawn beside the local runs (default: none)")


def configure(name: str, parser: argparse.ArgumentParser) -> None:
    _protocol_flags(parser)
    """Add the arguments of subcommand ``name`` to ``parser`` (imports nothing heavy: ``--help`` stays fast)."""
    if name == "leaderboard":
        parser.add_argument("dirs", nargs="+", metavar="DIR", help="results directories (results/<sweep name>)")
        parser.add_argument("--markdown", metavar="FILE",
                            help="also write the Markdown to FILE (default: stdout only; "
                                 "`--out FILE` is its deprecated spelling)")
        return
    if name == "compare":
        parser.add_argument("dirs", nargs="+", metavar="DIR",
                            help="two or more results directories of one protocol (results/<sweep name>); "
                                 "differences are taken against the first")
        parser.add_argument("--figures", metavar="DIR",
                            help="folder for compare.png (default: the folders' common parent, e.g. results/)")
        parser.add_argument("--markdown", metavar="FILE", help="also write the Markdown table to FILE "
                                                              "(default: stdout only)")
        return
    if name == "regime":
        parser.add_argument("dirs", nargs="+", metavar="DIR",
                            help="results directories of the regime search (results/cpu-regime-*), pooled")
        parser.add_argument("--figures", metavar="DIR",
                            help="folder for regime.png and regime.md (default: the folders' common parent's "
                                 "regime/, e.g. results/regime)")
        parser.add_argument("--markdown", metavar="FILE", help="write the Markdown to FILE instead (default: "
                                                              "regime.md in the --figures folder)")
        parser.add_argument("--compare", metavar="CSV", help="the study's diagnostics CSV (oec_paper_diagnostics.csv)"
                                                             ": its untied baselines drawn and listed (default: none)")
        return
    parser.add_argument("results_dir", metavar="DIR", help="results directory (results/<sweep name>)")
    if name == "precision-tax":
        parser.add_argument("--run", metavar="RUN_ID", help="the saved run (DIR/models/RUN_ID.pt; default: the only one)")
        parser.add_argument("--figures", metavar="DIR", help="folder for precision_tax.png (default: DIR/figures)")
        parser.add_argument("--markdown", metavar="FILE", help="also write the Markdown to FILE (default: stdout only)")
        parser.add_argument("--compare", metavar="CSV", help="the study's diagnostics CSV (oec_paper_diagnostics.csv): "
                                                             "predict its untied gaps (default: none)")
        return
    if name == "claims":
        parser.add_argument("--lambda", dest="lambda_dir", metavar="DIR",
                            help="results directory of a λ sweep, for claim (e) (default: none)")
        parser.add_argument("--lr-max", type=float, metavar="LR",
                            help="use only learning rates <= LR, e.g. 0.3, the top of the study's grid "
                                 "(default: all)")
        parser.add_argument("--markdown", metavar="FILE",
                            help="also write the Markdown to FILE (default: stdout only; "
                                 "`--out FILE` is its deprecated spelling)")
    elif name == "figures":
        parser.add_argument("--figures", metavar="DIR",
                            help="output folder (default: DIR/figures; `--out DIR` is its deprecated spelling)")
    else:
        parser.add_argument("--html", metavar="FILE",
                            help="the HTML file (default: DIR/report.html; `--out FILE` is its deprecated spelling)")
    parser.add_argument("--compare", metavar="CSV", help=COMPARE_HELP)


def _protocol_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--study", metavar="NAME", default=None,
                        help="only the runs of this sweep (a results directory can hold several after "
                             "`--force-new-protocol`; default: all, which must share one protocol)")
    parser.add_argument("--loss", choices=("final_loss", "final_loss_fp32"), default="final_loss",
                        help="the final loss tables, figures and LRS use: in the run's precision, or the same "
                             "weights re-evaluated in fp32 (default: %(default)s)")
    parser.add_argument("--mixed-protocols", action="store_true",
                        help="pool runs of different protocols anyway (default: refuse, naming what differs)")


def _load(path: str, args: argparse.Namespace):
    from bench.errors import UsageError

    from .results import load_results

    from .results import use_loss

    try:
        res = load_results(path, args.study, args.mixed_protocols)
        res.runs = use_loss(res.runs, getattr(args, "loss", "final_loss"))
        return res
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None


def _published(path: str | None):
    from bench.errors import UsageError

    from .external import read_published

    if path is None:
        return None
    try:
        return read_published(path)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"--compare: {e}") from None


def _figures(args: argparse.Namespace) -> int:
    from .figures import draw_all, save_figure
    from .tables import write_tables

    res = _load(args.results_dir, args)
    published = _published(args.compare)
    out = Path(args.figures) if args.figures else res.path / "figures"
    written: list[Path] = []
    for d in draw_all(res.runs, res.curves, published):
        if d.fig is None:
            print(f"note: figure {d.name} skipped: {d.note}")
            continue
        written += save_figure(d.fig, out, d.name)
    written += write_tables(res.runs, out)
    if published is not None:
        written += write_tables(published, out, suffix="_published")
    for p in written:
        print(f"wrote {p}")
    for p in sorted(_known_outputs(out) - set(written)):
        if p.is_file():  # from an earlier run whose data could show it: it would no longer match
            p.unlink()
            print(f"removed stale {p}")
    print(f"{len(written)} files in {out}")
    return 0


def _known_outputs(out: Path) -> set[Path]:
    """Every file name `stabench figures` can write into ``out``."""
    from .figures import FIGURES, PUBLISHED_FIGURES
    from .tables import TABLES

    names = {out / f"{f.name}.{ext}" for f in FIGURES + PUBLISHED_FIGURES for ext in ("png", "pdf")}
    return names | {out / f"{t.name}{suffix}.{ext}" for t in TABLES for suffix in ("", "_published")
                    for ext in ("md", "tex")}


def _report(args: argparse.Namespace) -> int:
    from .report import write_report

    res = _load(args.results_dir, args)
    published = _published(args.compare)
    out = Path(args.html) if args.html else res.path / "report.html"
    path = write_report(res, out, published)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB); open it in a browser")
    return 0


def _leaderboard(args: argparse.Namespace) -> int:
    from .leaderboard import leaderboard, to_text

    return _emit(to_text(leaderboard([_load(d, args) for d in args.dirs])), args.markdown)


def _emit(text: str, out: str | None) -> int:
    """Print Markdown ``text`` and also write it to ``out`` if given."""
    sys.stdout.write(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
        print(f"\nwrote {out}")
    return 0


def _claims(args: argparse.Namespace) -> int:
    from .claims import markdown

    res = _load(args.results_dir, args)
    lam = _load(args.lambda_dir, args).runs if args.lambda_dir else None
    return _emit(markdown(res.runs, lam, _published(args.compare), lr_max=args.lr_max), args.markdown)


def _compare(args: argparse.Namespace) -> int:
    import os

    from bench.errors import UsageError

    from . import compare as cmp
    from .figures import save_figure

    if len(args.dirs) < 2:
        raise UsageError(f"compare needs two or more results directories, got {len(args.dirs)}")
    results = [_load(d, args) for d in args.dirs]
    labels = cmp.folder_labels(args.dirs)
    cmp.check_protocols(results, labels)  # before anything is written
    c = cmp.compare(results, labels)
    text = cmp.markdown(c, cmp.protocol_settings(results[0].runs))
    out = Path(args.figures) if args.figures else Path(os.path.commonpath([Path(d).resolve().parent
                                                                             for d in args.dirs]))
    written = save_figure(cmp.figure(c), out, "compare", formats=("png",))
    _emit(text, args.markdown)
    for p in written:
        print(f"wrote {p}")
    return 0


def _precision_tax(args: argparse.Namespace) -> int:
    from bench.errors import UsageError

    from . import precision_tax as pt
    from .figures import save_figure
    from .tables import to_markdown

    try:
        logits, targets, cfg = pt.run_logits(args.results_dir, args.run)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    published = _published(args.compare)
    tax = pt.offset_tax(logits, targets)
    gaps = pt.predict_gaps(logits, targets, published) if published is not None else None
    what = (f"run {cfg['run_id']}: {cfg['model']} {cfg['stabilizer']} lr={cfg['lr']:g}, V={cfg['vocab_size']}, "
            f"{logits.shape[0]} validation tokens, data {cfg['data']}")

    def g4(df):
        return df.map(lambda x: f"{x:.4g}" if isinstance(x, float) else x)

    wide = g4(tax.pivot(index="offset", columns="format", values="tax").reset_index())
    parts = [f"Precision tax of a logit offset ({what}; exact loss {tax['exact'].iloc[0]:.4f} nats):", "",
             "Cross-entropy increase (nats) when c is added to every logit and the logits are rounded:", "",
             to_markdown(wide.rename(columns={"offset": "c (nats)"})), ""]
    if gaps is not None:
        parts += ["The study's untied baselines: the bf16 tax of their published mean logit on this run's logits "
                  "(tax) beside the published gap to μ-centering (nats):", "",
                  to_markdown(g4(gaps)), ""]
    out = Path(args.figures) if args.figures else Path(args.results_dir) / "figures"
    written = save_figure(pt.tax_figure(tax, gaps, what), out, "precision_tax", formats=("png",))
    _emit("\n".join(parts), args.markdown)
    for p in written:
        print(f"wrote {p}")
    return 0


def _regime(args: argparse.Namespace) -> int:
    import os

    import pandas as pd

    from bench.errors import UsageError

    from . import regime
    from .figures import save_figure

    results = [_load(d, args) for d in args.dirs]
    published = _published(args.compare)
    try:
        study = regime.study_baselines(published) if published is not None else None
    except ValueError as e:
        raise UsageError(f"--compare: {e}") from None
    runs = pd.concat([r.runs for r in results], ignore_index=True)
    curves = pd.concat([r.curves for r in results if len(r.curves)], ignore_index=True) \
        if any(len(r.curves) for r in results) else pd.DataFrame(columns=["run_id", "step"])
    table = regime.regime_table(runs, curves)
    out = Path(args.figures) if args.figures else Path(os.path.commonpath([Path(d).resolve().parent
                                                                             for d in args.dirs])) / "regime"
    written = save_figure(regime.figure(table, curves, study), out, "regime", formats=("png",))
    _emit(regime.markdown(table, study), args.markdown or str(out / "regime.md"))
    for p in written:
        print(f"wrote {p}")
    return 0


def main(name: str, args: argparse.Namespace) -> int:
    """Run subcommand ``name``; bad input raises ``bench.errors.UsageError`` (one line, exit 2)."""
    import matplotlib

    matplotlib.use("Agg")  # headless: never open a window
    return {"figures": _figures, "report": _report, "leaderboard": _leaderboard, "claims": _claims,
            "compare": _compare, "precision-tax": _precision_tax, "regime": _regime}[name](args)
