"""``stabench perf``: the command line of :mod:`bench.perf` (kept apart so that ``--help`` needs no torch)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def configure(name: str, p: argparse.ArgumentParser) -> None:
    from .presets import PRESETS

    p.add_argument("--preset", action="append", choices=list(PRESETS), metavar="PRESET",
                   help="model preset to time, repeatable; one of %(choices)s (default: the CPU presets "
                        "nano..small on CPU, 16M..221M on CUDA)")
    p.add_argument("--quick", action="store_true", help="a few steps only: a smoke test, not a measurement")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE (default: not written)")
    p.add_argument("--markdown", metavar="FILE",
                   help="also write the tables as Markdown (the README's) to FILE (default: not written)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="device to time on; auto = CUDA when available (default: %(default)s)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "bf16-emu"],
                   help="numeric precision of the timed steps (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="intra-op threads (default: all cores on CPU)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N",
                   help="sequences per step (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=64, metavar="TOKENS",
                   help="tokens per sequence (default: %(default)s)")
    p.add_argument("--vocab-size", type=int, default=None, metavar="TOKENS",
                   help="vocabulary size in tokens (default: 8192 on CPU, 50304 on CUDA)")
    p.add_argument("--compile", action="store_true", help="time torch.compile'd models (default: eager)")
    p.add_argument("--head-chunk", type=int, default=None, metavar="TOKENS",
                   help="tokens per chunk of the loss head; 0 = unchunked (default: the run default, "
                        "bench.config.DEFAULT_HEAD_CHUNK)")
    p.add_argument("--skip", action="append", default=[], choices=["overhead", "layouts", "packed", "head"],
                   help="skip a section, repeatable; one of %(choices)s (default: run all)")
    p.add_argument("--overhead-preset", action="append", default=None, choices=list(PRESETS), metavar="PRESET",
                   help="preset for the stabilizer overhead, repeatable; one of %(choices)s (default: micro on CPU, 16M on CUDA, "
                        "else the first timed preset, plus the largest timed preset)")


def main(name: str, args: argparse.Namespace) -> int:
    from .config import machine_device
    from .errors import UsageError
    from .perf import format_markdown, format_table, run_perf
    from .presets import CPU_PRESETS, PRESETS, STUDY_PRESETS

    cuda = machine_device(args.device) == "cuda"
    presets = args.preset or list(STUDY_PRESETS if cuda else CPU_PRESETS)
    bad = [p for p in presets if p not in PRESETS]
    if bad:
        raise UsageError(f"unknown preset {bad[0]!r}; allowed: {', '.join(PRESETS)}")
    sections = {"overhead", "layouts", "packed", "head"} - set(args.skip)
    over = args.overhead_preset or list(dict.fromkeys(
        [next((p for p in ("micro", "16M") if p in presets), presets[0]), max(presets, key=list(PRESETS).index)]))
    bad = [p for p in over if p not in PRESETS]
    if bad:
        raise UsageError(f"unknown preset {bad[0]!r}; allowed: {', '.join(PRESETS)}")
    result = run_perf(presets, quick=args.quick, device=args.device, precision=args.precision,
                      threads=args.threads, batch_size=args.batch_size, seq_len=args.seq_len,
                      vocab_size=args.vocab_size, compile_=args.compile, sections=sections, overhead_presets=over,
                      head_chunk=args.head_chunk,
                      log=lambda m: print(m, file=sys.stderr, flush=True))
    print(format_table(result))
    if args.json:
        import json
        _write(args.json, json.dumps(result, indent=2) + "\n")
    if args.markdown:
        _write(args.markdown, format_markdown(result))
    return 0


def _write(where: str, text: str) -> None:
    path = Path(where)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}")
