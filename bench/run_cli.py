"""``stabench run`` and ``stabench presets``."""
from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path

from .config import RunConfig, fields_with


def _flag_type(annotation: typing.Any) -> type:
    """The argparse type of a field annotation: ``int | None`` -> int, a Literal of strings -> str."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return type(args[0])
    return _flag_type(args[0]) if args else annotation


# CLI flag -> RunConfig field, from the fields' ``cli`` metadata (flags left unset fall back to
# --config, then to defaults)
RUN_FLAGS: dict[str, tuple[str, type]] = {
    "--" + f.name.replace("_", "-"): (f.name, _flag_type(typing.get_type_hints(RunConfig)[f.name]))
    for f in fields_with(flag="cli")}

BUILTIN_STABILIZERS = ("baseline", "zloss", "softcap", "muloss", "mucentering")
"""= bench.stabilizers.BUILTIN (a test checks; importing it here would import torch for --help)."""

# RunConfig field -> (metavar, help: what it is, in which unit). Every ``cli`` field needs one (a test checks);
# the default and the allowed values are added from the field itself.
FIELD_HELP: dict[str, tuple[str, str]] = {
    "model": ("PRESET", "model preset (`stabench presets` lists their sizes)"),
    "stabilizer": ("SPEC", "stabilizer: a built-in ({builtin}), module:Class, path/file.py:Class or an "
                           "entry-point name"),
    "lr": ("LR", "peak learning rate, per step, after linear warmup"),
    "min_lr": ("LR", "final learning rate of the cosine decay"),
    "steps": ("STEPS", "training steps (optimizer updates)"),
    "warmup": ("STEPS", "linear warmup steps, < --steps"),
    "batch_size": ("N", "sequences per step"),
    "micro_batch_size": ("N", "sequences per forward pass, dividing --batch-size (gradient accumulation); "
                              "unset = --batch-size"),
    "seq_len": ("TOKENS", "tokens per sequence"),
    "vocab_size": ("TOKENS", "vocabulary size; L0 = ln V"),
    "data": ("SPEC", "token data: synthetic[:tokens=N,zipf=X,...], text:PATH or bin:PATH"),
    "seed": ("N", "initialization seed (and batch order unless --data-seed)"),
    "data_seed": ("N", "batch-order seed; unset = --seed"),
    "device": ("DEVICE", "where to train; auto = CUDA when available"),
    "precision": ("PREC", "numeric precision; auto = bf16 on CUDA and CPUs with bf16 units, else fp32"),
    "threads": ("N", "intra-op CPU threads; unset = torch's default (all usable cores)"),
    "eval_every": ("STEPS", "validate every this many steps"),
    "eval_batches": ("N", "validation batches per evaluation"),
    "log_every": ("STEPS", "log (and check divergence) every this many steps"),
    "weight_decay": ("WD", "AdamW weight decay (never on gains)"),
    "grad_clip": ("NORM", "global gradient-norm clipping threshold"),
    "log": ("TRACKER", "also log the curves to an experiment tracker, under --out "
                       "(tensorboard/, wandb/ offline, mlflow mlruns/)"),
}


def _field_help(f: dataclasses.Field) -> dict[str, typing.Any]:
    """argparse keywords of the flag of RunConfig field ``f``: metavar, help with default and choices."""
    metavar, text = FIELD_HELP[f.name]
    text = text.format(builtin=", ".join(BUILTIN_STABILIZERS))
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    kw: dict[str, typing.Any] = {"metavar": metavar}
    annotation = typing.get_type_hints(RunConfig)[f.name]
    if typing.get_origin(annotation) is typing.Literal:
        kw["choices"] = list(typing.get_args(annotation))
        text += "; one of %(choices)s"
    elif f.name == "model":
        from .presets import PRESETS
        text += f"; one of {', '.join(PRESETS)}"
    if default is not None:  # the flags default to None (unset: --config, then the field's default)
        text += f" (default: {default})"
    kw["help"] = text.replace("%", "%%").replace("%%(choices)s", "%(choices)s")
    return kw


def configure(name: str, p: argparse.ArgumentParser) -> None:
    if name == "presets":
        p.add_argument("--vocab-size", type=int, default=None, metavar="TOKENS",
                       help="vocabulary size in tokens (default: 8192 for CPU presets, 50304 for the study's)")
        return
    p.add_argument("--config", metavar="FILE.toml",
                   help="RunConfig values from a TOML file; flags override them (default: none)")
    by_name = {f.name: f for f in fields_with(flag="cli")}
    for flag, (field, typ) in RUN_FLAGS.items():
        p.add_argument(flag, dest=field, type=typ, default=None, **_field_help(by_name[field]))
    p.add_argument("--lam", type=float, default=None, metavar="λ",
                   help="λ of zloss / muloss, >= 0, e.g. 1e-4 (default: the stabilizer's)")
    p.add_argument("--cap", type=float, default=None, metavar="C",
                   help="cap c of softcap, > 0, in logit units, e.g. 30 (default: the stabilizer's)")
    p.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE",
                   help="any stabilizer hyperparameter (third-party stabilizers), a number; repeatable "
                        "(default: none)")
    p.add_argument("--weight-tying", dest="weight_tying", action=argparse.BooleanOptionalAction, default=None,
                   help="share the token embedding and the LM head (default: untied)")
    p.add_argument("--compile", dest="compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: eager)")
    p.add_argument("--out", default="results/dev", metavar="DIR",
                   help="results directory: runs.parquet and curves.parquet are appended there (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress output (default: a progress line per log)")
    p.add_argument("--save-model", action="store_true",
                   help="also write the final weights to DIR/models/<run_id>.pt (for `stabench precision-tax`)")


def config_from_args(args: argparse.Namespace):
    from .errors import UsageError
    from .config import from_dict, load_toml

    values = load_toml(args.config) if args.config else {}
    source = args.config or "command line"
    for _, (field, _) in RUN_FLAGS.items():
        if getattr(args, field) is not None:
            values[field] = getattr(args, field)
    for field in ("weight_tying", "compile"):
        if getattr(args, field) is not None:
            values[field] = getattr(args, field)
    hparams = dict(values.get("hparams", {}))
    for key in ("lam", "cap"):
        if getattr(args, key) is not None:
            hparams[key] = getattr(args, key)
    for item in args.hp:
        k, sep, v = item.partition("=")
        try:
            hparams[k] = float(v)
        except ValueError:
            raise UsageError(f"--hp {item!r}: expected KEY=NUMBER") from None
        if not sep:
            raise UsageError(f"--hp {item!r}: expected KEY=NUMBER")
    values["hparams"] = hparams
    return from_dict(values, source).check(source)


def main(name: str, args: argparse.Namespace) -> int:
    if name == "presets":
        return _presets(args)
    from . import records
    from .tracking import open_tracker
    from .trainer import train

    cfg = config_from_args(args)  # every check happens before anything is written
    tracker = open_tracker(cfg.log, args.out)  # a missing tracker package is an error before training
    result = train(cfg, progress=not args.quiet, tracker=tracker, keep_weights=args.save_model)
    records.write_run(args.out, result.run, result.curve)
    if args.save_model:
        records.save_weights(args.out, result.run["run_id"], cfg.to_dict(), result.weights)
    r = result.run
    status = f"DIVERGED at step {r['diverged_step']} ({r['diverged_reason']})" if r["diverged"] else "finished"
    print(f"{r['run_id']}: {status}; final val loss {r['final_loss']:.4f} (L0 {r['L0']:.2f}); "
          f"{r['tokens_per_s']:.0f} tokens/s; wrote {Path(args.out) / 'runs.parquet'}")
    return 0


def _presets(args: argparse.Namespace) -> int:
    from .presets import ARCH_VERSION, CPU_PRESETS, PRESETS, count_params, preset

    print(f"architecture version {ARCH_VERSION}; parameters counted untied and tied (the study's names "
          "are the tied counts)")
    print(f"{'preset':8} {'layers':>6} {'width':>6} {'heads':>5} {'swiglu':>6} {'vocab':>6} {'untied':>12} "
          f"{'tied':>12}")
    for name, (n_layer, n_embd, n_head) in PRESETS.items():
        V = args.vocab_size or (8192 if name in CPU_PRESETS else 50304)
        untied = count_params(preset(name, vocab_size=V))
        tied = count_params(preset(name, vocab_size=V, weight_tying=True))
        ffn = preset(name).ffn_dim
        print(f"{name:8} {n_layer:>6} {n_embd:>6} {n_head:>5} {ffn:>6} {V:>6} {untied:>12,} {tied:>12,}")
    return 0
