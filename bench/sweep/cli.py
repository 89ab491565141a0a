"""``stabench sweep | worker | status | launch``: the sweep engine's command line."""
from __future__ import annotations

import argparse
import errno
from pathlib import Path

STORAGE_ENV = "STABENCH_STORAGE"  # = storage.STORAGE_ENV (a test checks); not imported: it needs optuna

STORAGE_HELP = (f"Optuna storage: a journal file path, or a database URL such as "
                f"postgresql://user:PASSWORD@host/db (default: ${STORAGE_ENV} if set, else the journal file "
                "<out>/journal.log; the variable keeps the password off the command line)")
SWEEP_FILE_HELP = "the sweep file (see sweeps/; `--sweep FILE.toml` is its deprecated spelling)"
OUT_HELP = "results directory (default: results/<sweep name>, the sweep file's name)"


def _force_new_protocol(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force-new-protocol", action="store_true",
                   help="the sweep's [train] settings differ from the runs already in its study or results "
                        "directory: start a new study <name>-<protocol hash> there, its rows kept apart "
                        "(default: refuse, naming the changed settings)")


def configure(name: str, p: argparse.ArgumentParser) -> None:
    if name == "sweep":
        p.add_argument("file", metavar="FILE.toml", help="the sweep file (see sweeps/)")
        p.add_argument("--workers", type=int, default=None, metavar="N",
                       help="worker processes, >= 1 (default: one per core, or one per GPU)")
        p.add_argument("--storage", default=None, metavar="URL|FILE", help=STORAGE_HELP)
        p.add_argument("--out", default=None, metavar="DIR", help=OUT_HELP)
        _force_new_protocol(p)
    elif name == "worker":
        p.add_argument("file", metavar="FILE.toml", help=SWEEP_FILE_HELP)
        p.add_argument("--storage", default=None, metavar="URL|FILE", help=STORAGE_HELP)
        p.add_argument("--out", default=None, metavar="DIR", help=OUT_HELP + "; shared by all workers")
        p.add_argument("--threads", type=int, default=None, metavar="N",
                       help="intra-op threads for training, >= 1 (default: torch's, all usable cores)")
        p.add_argument("--wait", action="store_true",
                       help="stay until no trial is running anywhere, to retry those of workers that die "
                            "(default: leave when nothing is queued)")
        p.add_argument("--max-trials", type=int, default=None, metavar="N",
                       help="leave after claiming N trials (default: no limit)")
        p.add_argument("--no-enqueue", dest="enqueue", action="store_false",
                       help="only take trials already queued (default: queue the sweep's missing points first)")
        _force_new_protocol(p)
    elif name == "proxy":
        p.add_argument("--storage", default=None, metavar="URL",
                       help=f"the database to serve, e.g. postgresql://user:PASSWORD@host/db (default: ${STORAGE_ENV})")
        p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
        p.add_argument("--port", type=int, default=13000, help="TCP port to listen on (default: %(default)s)")
    elif name == "status":
        p.add_argument("target", metavar="DIR|FILE.toml",
                       help="results directory (results/<sweep name>) or sweep file")
        p.add_argument("--storage", default=None, metavar="URL|FILE", help=STORAGE_HELP)
        p.add_argument("--out", default=None, metavar="DIR",
                       help="results directory when the target is a sweep file (default: results/<sweep name>)")
        p.add_argument("--full", action="store_true",
                       help="print each failure's traceback (default: its last line)")
    elif name == "launch":
        p.add_argument("backend", choices=["slurm"], help="cluster scheduler; one of %(choices)s")
        p.add_argument("file", metavar="FILE.toml", help=SWEEP_FILE_HELP)
        p.add_argument("--storage", default=None, metavar="URL|FILE", help=STORAGE_HELP)
        p.add_argument("--array", type=int, required=True, metavar="N",
                       help="array tasks, i.e. workers, >= 1 (required)")
        p.add_argument("--out", default=None, metavar="DIR",
                       help=OUT_HELP + ", on the shared file system (`--results DIR` is its deprecated spelling)")
        p.add_argument("--script", default=None, metavar="FILE",
                       help="where to write the sbatch script (default: <out>/trials/slurm.sh)")
        p.add_argument("--submit", action="store_true", help="also submit it with sbatch (default: only write it)")
        p.add_argument("--time", default="24:00:00", metavar="HH:MM:SS",
                       help="wall-clock limit per task (default: %(default)s)")
        p.add_argument("--partition", default=None, help="Slurm partition (default: the cluster's default)")
        p.add_argument("--account", default=None, help="Slurm account (default: yours)")
        p.add_argument("--gpus", type=int, default=None, metavar="N",
                       help="GPUs per task (default: 1 when the sweep's device is cuda, else 0)")
        p.add_argument("--cpus", type=int, default=None, metavar="N",
                       help="CPU cores per task (default: 8 with a GPU, else 1)")
        p.add_argument("--mem", default=None, metavar="SIZE",
                       help="memory per task, e.g. 64G (default: the partition's)")
        p.add_argument("--max-parallel", type=int, default=None, metavar="N",
                       help="at most N tasks at once (default: no limit)")
        p.add_argument("--setup", default="", metavar="SHELL",
                       help="shell lines run before the worker, e.g. 'source .venv/bin/activate' (default: none)")
        _force_new_protocol(p)


def _out(spec, out: str | None) -> Path:
    return Path(out) if out else Path("results") / spec.name


def record_sweep_file(path: str, spec, out: Path) -> None:
    """Copy the sweep file to <out>/sweep.toml and write <out>/sweep.json with its sha256 (provenance
    for figures, report and leaderboard). Rewritten when the file changed; a changed file keeps finished
    trials whose configs it still produces (keys are config hashes), so the hash names the latest file."""
    import hashlib
    import json

    from ..records import atomic_write

    data = Path(path).read_bytes()
    meta = {"name": spec.name, "file": str(path), "sweep_hash": hashlib.sha256(data).hexdigest()}
    for name, content in (("sweep.toml", data), ("sweep.json", (json.dumps(meta, indent=2) + "\n").encode())):
        atomic_write(out / name, lambda tmp: tmp.write_bytes(content))


def _positive(flag: str, value: int | None) -> None:
    from ..errors import UsageError
    if value is not None and value < 1:
        raise UsageError(f"{flag} must be >= 1, got {value}")


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)  # a full disk, a full quota


def main(name: str, args: argparse.Namespace) -> int:
    """Run one subcommand; a full disk (or quota) is a one-line error, exit 2: every write of the
    sweep engine is atomic or truncated back, so what was recorded before is intact."""
    try:
        return _main(name, args)
    except OSError as e:
        if e.errno not in NO_SPACE:
            raise
        from ..errors import UsageError
        where = f" writing {e.filename}" if e.filename else ""
        raise UsageError(f"{e.strerror or 'no space left on device'}{where}: free some space and run the same "
                         "command again (everything recorded so far is kept; unfinished trials are retried)") from None


def _main(name: str, args: argparse.Namespace) -> int:
    from .spec import load_spec

    if name == "proxy":
        import os

        from ..errors import UsageError
        from .storage import mask_url, run_proxy
        url = args.storage or os.environ.get(STORAGE_ENV)
        if not url:
            raise UsageError(f"proxy: give the database with --storage URL or ${STORAGE_ENV}")
        print(f"serving {mask_url(url)} as grpc://{args.host}:{args.port} (workers: --storage "
              f"grpc://{args.host}:{args.port}); Ctrl-C stops it", flush=True)
        run_proxy(url, args.host, args.port)
        return 0
    if name == "status":
        from .status import locate, render
        print(render(locate(args.target, args.storage, args.out), full_errors=args.full).rstrip("\n"))
        return 0
    # validated before anything runs (every trial; launch: not against this machine, the workers check that)
    spec = load_spec(args.file, check_machine=name != "launch")
    out = _out(spec, args.out)  # the results directory keeps the file's name under --force-new-protocol
    if args.force_new_protocol:
        from ..config import protocol_fingerprint
        spec = spec.renamed(f"{spec.name}-{protocol_fingerprint(spec.protocol)}")
    if name == "sweep":
        from .local import run_local
        _positive("--workers", args.workers)
        # the sweep file is recorded once the storage is open and the grid queued
        p = run_local(spec, args.storage, out, args.workers, on_ready=lambda: record_sweep_file(args.file, spec, out))
        return 1 if p.failed else 0
    if name == "worker":
        from .worker import run_worker
        _positive("--threads", args.threads)
        report = run_worker(spec, args.storage, out, threads=args.threads, enqueue=args.enqueue,
                            wait=args.wait, max_trials=args.max_trials,
                            on_ready=lambda: record_sweep_file(args.file, spec, out))
        return 1 if report.failed else 0
    if name == "launch":
        from .slurm import SlurmOptions, slurm_script, submit
        from .storage import mask_url
        opts = SlurmOptions(array=args.array, time=args.time, partition=args.partition, account=args.account,
                            gpus=args.gpus, cpus=args.cpus, mem=args.mem, max_parallel=args.max_parallel,
                            setup=args.setup, force_new_protocol=args.force_new_protocol)
        text = slurm_script(spec, args.file, args.storage, out, opts)
        script = Path(args.script) if args.script else out / "trials" / "slurm.sh"
        script.parent.mkdir(parents=True, exist_ok=True)
        (out / "trials").mkdir(parents=True, exist_ok=True)  # sbatch needs the log directory to exist
        script.write_text(text)
        script.chmod(0o755)
        print(f"wrote {script}: {args.array} array task(s) of `stabench worker` for sweep {spec.name}"
              f" (storage {mask_url(args.storage) if args.storage else 'journal ' + str(out / 'journal.log')})")
        if args.submit:
            job = submit(script, args.storage)
            print(f"submitted Slurm job {job}; watch it with: stabench status {args.file} --out {out}")
        else:
            print(f"submit it on the cluster with: {STORAGE_ENV}='<storage URL>' sbatch {script}")
        return 0
    raise AssertionError(name)  # pragma: no cover
