"""Issue 16: bad input gets one clear line and exit code 2, before anything runs.

One test per cause, parametrized over its cases; each drives ``bench.cli.main`` in-process on
real files (a sweep file, a config file, data files, plug-in modules) and checks the exit code,
that stderr is one line naming the key or file, and that nothing was written.
"""
from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.cli import main
from bench.config import RunConfig, from_dict
from bench.errors import StabilizerError

RUN = ["run", "--model", "nano", "--vocab-size", "256", "--seq-len", "16", "--batch-size", "2", "--steps", "4",
       "--warmup", "1", "--eval-every", "2", "--eval-batches", "1", "--threads", "1", "--quiet"]


def refused(capsys, argv: list[str], *words: str) -> str:
    """Run the CLI; assert exit code 2 and one stderr line containing ``words``; return it."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def sweep_file(tmp_path: Path, train: str = "", grid: str = "", stabilizers: str = "baseline = {}",
               name: str = "bad") -> Path:
    """A tiny sweep; ``train`` lines replace the default [train] lines of the same keys."""
    path = tmp_path / "sweep.toml"
    base = {"steps": "4", "warmup": "1", "batch_size": "2", "seq_len": "16", "vocab_size": "256", "eval_every": "2",
            "eval_batches": "1", "data": '"synthetic:tokens=5000"'}
    for line in filter(None, train.splitlines()):
        k, _, v = line.partition("=")
        base[k.strip()] = v.strip()
    lines = "\n".join(f"{k} = {v}" for k, v in base.items())
    path.write_text(f'name = "{name}"\n[train]\n{lines}\n[grid]\nmodels = ["nano"]\nlr = [1e-3]\n{grid}\n'
                    f"[stabilizers]\n{stabilizers}\n")
    return path


def refused_sweep(capsys, tmp_path: Path, path: Path, *words: str) -> str:
    out = tmp_path / "out"
    line = refused(capsys, ["sweep", path, "--out", out, "--workers", "1"], *words)
    assert not out.exists()
    return line


# -- data files ----------------------------------------------------------------------------------

def shard(path: Path, tokens, *, header_count: int | None = None, version: int = 1) -> Path:
    """An llm.c shard (header of 256 int32: magic, version, count) or, without a version, raw uint16."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = np.asarray(tokens, dtype=np.uint16 if version == 1 else np.uint32).tobytes()
    header = np.zeros(256, dtype=np.int32)
    header[:3] = [20240520, version, len(tokens) if header_count is None else header_count]
    path.write_bytes(header.tobytes() + body)
    return path


def bin_dir(tmp_path: Path, case: str) -> Path:
    root = tmp_path / "bin"
    good = np.arange(4000) % 256
    shard(root / "data_train_000.bin", good)
    shard(root / "data_val_000.bin", good)
    if case == "count beyond the file":
        shard(root / "data_train_001.bin", good, header_count=10_000)
    elif case == "odd byte count":
        (root / "data_train_001.bin").write_bytes(np.asarray(good, dtype=np.uint16).tobytes() + b"\x01")
    elif case == "empty shard":
        (root / "data_train_001.bin").write_bytes(b"")
    elif case == "token id >= V in a later shard":
        shard(root / "data_train_001.bin", np.r_[good, 300])
    elif case == "token id >= V in the validation split":
        shard(root / "data_val_000.bin", np.r_[good, 999])
    return root


BIN_CASES = ["count beyond the file", "odd byte count", "empty shard", "token id >= V in a later shard",
             "token id >= V in the validation split"]

# -- cause 7: values that passed validation and failed later ----------------------------------------

CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("case", ["negative seed", "cuda without CUDA", "binary text file", "synthetic tokens=abc",
                                  "synthetic zipf=0", "synthetic branching=nan", "synthetic tokens=0",
                                  *BIN_CASES, "string hyperparameter of a plug-in", "spike_window = -1"])
@pytest.mark.parametrize("path", ["run", "sweep"])
def test_values_that_would_fail_later_are_refused_before_training(capsys, tmp_path, case, path):
    if case == "cuda without CUDA" and CUDA:
        pytest.skip("this machine has CUDA")
    flags: list[str] = []
    train, grid, stabilizers, words = "", "", "baseline = {}", []
    if case == "negative seed":
        flags, grid, words = ["--seed", "-1"], "seeds = [1, -1]", ["seed", "-1"]
    elif case == "cuda without CUDA":
        flags, train, words = ["--device", "cuda"], 'device = "cuda"', ["device", "not available"]
    elif case == "binary text file":
        f = tmp_path / "corpus.txt"
        f.write_bytes(b"hello\x00\xff\xfe" * 100)
        flags, train, words = ["--data", f"text:{f}"], f'data = "text:{f}"', ["data", "corpus.txt", "binary"]
    elif case.startswith("synthetic"):
        opt = case.split()[1]
        flags, train, words = ["--data", f"synthetic:{opt}"], f'data = "synthetic:{opt}"', ["data", f"option {opt.split('=')[0]}="]
    elif case in BIN_CASES:
        root = bin_dir(tmp_path, case)
        flags, train, words = ["--data", f"bin:{root}"], f'data = "bin:{root}"', ["data", ".bin"]
    elif case == "string hyperparameter of a plug-in":
        plugin = tmp_path / "strhp.py"
        plugin.write_text(textwrap.dedent("""\
            from dataclasses import dataclass
            from bench.stabilizers import Stabilizer

            @dataclass(frozen=True)
            class Named(Stabilizer):
                name = "named"
                mode: str = "l2"
            """))
        spec = f"{plugin}:Named"
        flags, stabilizers, words = ["--stabilizer", spec], f'"{spec}" = {{}}', ["mode", "finite numbers"]
    elif case == "spike_window = -1":
        cfg = tmp_path / "run.toml"
        cfg.write_text("[divergence]\nspike_window = -1\n")
        flags, train, words = ["--config", cfg], "divergence = { spike_window = -1 }", ["divergence.spike_window"]
    if path == "run":
        out = tmp_path / "out"
        refused(capsys, [*RUN, "--data", "synthetic:tokens=5000", *flags, "--out", out], *words)
        assert not out.exists()
    else:
        refused_sweep(capsys, tmp_path, sweep_file(tmp_path, train, grid, stabilizers), *words)


def test_every_shard_is_checked_but_good_data_still_loads(tmp_path):
    from bench.data import load_data
    root = bin_dir(tmp_path, "good")
    shard(root / "data_train_001.bin", np.arange(5000) % 256)
    data = load_data(f"bin:{root}", 256)
    assert data.n_train_tokens == 9000


# -- cause 8: loose types ----------------------------------------------------------------------------

@pytest.mark.parametrize("line, key", [('steps = "12"', "steps"), ('lr = "0.01"', "lr"), ("seed = true", "seed"),
                                       ('compile = "yes"', "compile")])
@pytest.mark.parametrize("path", ["config file", "sweep [train]"])
def test_values_of_the_wrong_type_are_not_converted(capsys, tmp_path, line, key, path):
    if path == "config file":
        cfg = tmp_path / "run.toml"
        cfg.write_text(line + "\n")
        run = [a for i, a in enumerate(RUN) if "--steps" not in RUN[max(i - 1, 0):i + 1]]  # the flag would win
        line_out = refused(capsys, [*run, "--config", cfg, "--out", tmp_path / "out"], f"{key}:", "not converted")
    else:
        if key == "lr":  # an axis in a sweep
            line, key = 'min_lr = "0.01"', "min_lr"
        if key == "seed":
            line, key = "data_seed = true", "data_seed"
        line_out = refused_sweep(capsys, tmp_path, sweep_file(tmp_path, line), f"train.{key}")
    assert str(tmp_path) in line_out or "command line" in line_out or "sweep.toml" in line_out


@pytest.mark.parametrize("flags, key", [(["--vocab-size", "1"], "vocab_size"), (["--min-lr", "inf"], "min_lr"),
                                        (["--lr", "nan"], "lr"), (["--data", "synthetic:zipf=nan"], "zipf"),
                                        (["--weight-decay", "inf"], "weight_decay")])
def test_nonsense_numbers_are_refused(capsys, tmp_path, flags, key):
    refused(capsys, [*RUN, *flags, "--out", tmp_path / "out"], key)


def test_an_integer_is_still_a_valid_float():
    cfg = from_dict({"lr": 1, "hparams": {"lam": 1}})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.hparams == {"lam": 1.0}


# -- cause 9: sizes without bounds ----------------------------------------------------------------------

def test_a_huge_grid_is_counted_not_expanded(capsys, tmp_path):
    import time
    lrs = ", ".join(f"{1e-4 * (1 + i / 1000):.8f}" for i in range(1000))
    seeds = ", ".join(str(i) for i in range(1000))
    path = sweep_file(tmp_path, grid=f"seeds = [{seeds}]").read_text().replace("lr = [1e-3]", f"lr = [{lrs}]")
    (tmp_path / "sweep.toml").write_text(path)
    t0 = time.monotonic()
    refused_sweep(capsys, tmp_path, tmp_path / "sweep.toml", "grid", "1,000,000 trials", "100,000")
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("flags, key", [(["--vocab-size", "1000000000"], "vocab_size"),
                                        (["--seq-len", "100000000"], "seq_len"),
                                        (["--batch-size", "10000000"], "GiB")])
def test_a_step_that_cannot_fit_in_memory_is_refused(capsys, tmp_path, flags, key):
    refused(capsys, [*RUN, *flags, "--device", "cpu", "--out", tmp_path / "out"], key, "GiB", "CPU memory")


def test_estimate_step_bytes_by_hand():
    from bench.memory import estimate_eval_bytes, estimate_step_bytes
    cfg = RunConfig(model="nano", vocab_size=256, seq_len=16, batch_size=4, micro_batch_size=2, precision="fp32",
                    head_chunk=0, cpu_gemm="aten", device="cpu")
    L, H, n_head, V = 1, 32, 4, 256
    F = 256 * math.ceil((8 * H // 3) / 256)  # 256: the study's SwiGLU width
    P = 2 * V * H + L * (3 * H * H + H * H + 2 * (H // n_head) + 3 * H * F + 2 * H) + H
    N = 2 * 16  # micro-batch × seq_len
    want = 4 * P * 4 + N * (L * (16 * H + 4 * F) + 2 * H) * 4 + 3 * N * V * 4
    assert estimate_step_bytes(cfg) == want == 4 * 45_168 * 4 + 32 * 1600 * 4 + 98_304
    assert estimate_step_bytes(cfg.replace(precision="fp64")) == 2 * 4 * P * 4 + 2 * N * (16 * H + 4 * F + 2 * H) * 4 \
        + 3 * N * V * 4
    # the chunked head: 2 (chunk × V) fp32 buffers (logits, softmax) and the (V × H), (N × H) gradients, whatever
    # N is; 2 more under a logit transform (its value and slope), 1 more in bf16-emu (a rounding copy)
    chunked = cfg.replace(head_chunk=8)
    head = want - 3 * N * V * 4 + (V + N) * H * 4
    assert estimate_step_bytes(chunked) == head + 2 * 8 * V * 4
    assert estimate_step_bytes(cfg.replace(head_chunk=1000)) == head + 2 * N * V * 4
    assert estimate_step_bytes(chunked.replace(stabilizer="softcap")) == head + 4 * 8 * V * 4
    assert estimate_step_bytes(chunked.replace(precision="bf16-emu")) == head + 3 * 8 * V * 4
    # oneDNN's products (bench.gemm): one more (H × V) buffer, a chunk's addend to E's gradient, in training only
    assert estimate_step_bytes(chunked.replace(cpu_gemm="onednn")) == head + 2 * 8 * V * 4 + V * H * 4
    # a stabilizer whose loss_term reads the logits keeps the unchunked head, and its memory
    assert estimate_step_bytes(chunked.replace(stabilizer=str(Path(__file__).parent / "plugins" / "my_stabilizers.py") + ":LogitL2")) == want
    # one evaluation pass: the weights, one layer's activations, two logits-sized buffers
    assert estimate_eval_bytes(cfg) == P * 4 + N * (16 * H + 4 * F) * 4 + 2 * N * V * 4
    assert estimate_eval_bytes(chunked) == P * 4 + N * (16 * H + 4 * F) * 4 + 2 * 8 * V * 4
    assert estimate_eval_bytes(chunked.replace(cpu_gemm="onednn")) == estimate_eval_bytes(chunked)


# -- cause 10: plug-in stabilizers ----------------------------------------------------------------------

def _centering_by_delta(delta: str) -> str:
    """A μ-centering plug-in whose ``after_step_delta`` returns {OUTPUT_EMBEDDING: ``delta``}."""
    return f"""
        @dataclass(frozen=True)
        class P(Stabilizer):
            def after_step(self, params):
                E = params[OUTPUT_EMBEDDING]
                return {{OUTPUT_EMBEDDING: E - E.mean(0)}}

            def after_step_delta(self, params):
                return {{OUTPUT_EMBEDDING: {delta}}}
        """


def _muloss_with_grad(grad: str, uses: str = '{"output_embedding"}') -> str:
    """A μ-loss plug-in (λ = 1) whose ``loss_term_with_grad`` returns (‖μ‖², ``grad``); μ (1, H), V rows."""
    return f"""
        @dataclass(frozen=True)
        class P(Stabilizer):
            loss_term_uses = frozenset({uses})

            def loss_term(self, inputs):
                return inputs.output_embedding.mean(0).square().sum()

            def loss_term_with_grad(self, E):
                mu, V = E.mean(0, keepdim=True), E.shape[0]
                return mu.square().sum(), {grad}
        """


def _softcap_with_cap(cap: str, transform: bool = True) -> str:
    """A soft-capping plug-in, 30·tanh(l/30), whose ``logit_cap`` returns ``cap`` (without the transform when
    ``transform`` is False)."""
    body = "            def transform_logits(self, logits):\n                return 30.0 * torch.tanh(logits / 30.0)\n"
    return f"""
        import torch

        @dataclass(frozen=True)
        class P(Stabilizer):
{body if transform else ""}
            def logit_cap(self):
                return {cap}
        """


PLUGINS = {
    "import error": ("import no_such_module_for_stabench\n", "ModuleNotFoundError"),
    "syntax error": ("def broken(:\n", "SyntaxError"),
    "error in __init__": ("""
        @dataclass(frozen=True)
        class P(Stabilizer):
            def __post_init__(self):
                raise RuntimeError("no GPU driver")
        """, "RuntimeError: no GPU driver"),
    "vector loss": ("""
        @dataclass(frozen=True)
        class P(Stabilizer):
            def loss_term(self, inputs):
                return inputs.lse.mean(dim=-1)
        """, "loss_term must return a scalar loss"),
    "wrong logits shape": ("""
        @dataclass(frozen=True)
        class P(Stabilizer):
            def transform_logits(self, logits):
                return logits[..., :-1]
        """, "transform_logits must return logits"),
    "after_step wrong shape": ("""
        @dataclass(frozen=True)
        class P(Stabilizer):
            def after_step(self, params):
                E = params[OUTPUT_EMBEDDING]
                return {OUTPUT_EMBEDDING: E[:-1]}
        """, "after_step must return the new value of 'output_embedding'"),
    "(H,) tensor for E": ("""
        @dataclass(frozen=True)
        class P(Stabilizer):
            def after_step(self, params):
                return {OUTPUT_EMBEDDING: params[OUTPUT_EMBEDDING].mean(0)}
        """, "of shape ("),
    "unknown name": ("""
        @dataclass(frozen=True)
        class P(Stabilizer):
            def after_step(self, params):
                return {"lm_head.wieght": params[OUTPUT_EMBEDDING]}
        """, "unknown parameter name"),
    "in-place edit in after_step": ("""
        @dataclass(frozen=True)
        class P(Stabilizer):
            def after_step(self, params):
                E = params[OUTPUT_EMBEDDING]
                E.sub_(E.mean(0))
                return {}
        """, "in place"),
    "after_step_delta that disagrees": (_centering_by_delta("params[OUTPUT_EMBEDDING].mean(0)"),  # sign forgotten
                                        "after_step_delta disagrees with after_step"),
    "after_step_delta of a wrong shape": (_centering_by_delta("-params[OUTPUT_EMBEDDING].mean(1, keepdim=True)[:2]"),
                                          "after_step_delta must return the increment of 'output_embedding'"),
    "after_step_delta alone": ("""
        @dataclass(frozen=True)
        class P(Stabilizer):
            def after_step_delta(self, params):
                return {OUTPUT_EMBEDDING: -params[OUTPUT_EMBEDDING].mean(0)}
        """, "after_step_delta needs after_step beside it"),
    "loss_term_with_grad that disagrees": (_muloss_with_grad("mu / V"),  # the factor 2 forgotten
                                           "loss_term_with_grad disagrees with loss_term on the gradient"),
    "loss_term_with_grad of a wrong shape": (_muloss_with_grad("2 * mu.T / V"),
                                             "loss_term_with_grad must return the gradient of E second"),
    "loss_term_with_grad beside a term of h": (_muloss_with_grad("2 * mu / V", '{"output_embedding", "hidden"}'),
                                               "loss_term_with_grad needs beside it a loss_term that reads only"),
    "loss_term_with_grad alone": ("""
        @dataclass(frozen=True)
        class P(Stabilizer):
            def loss_term_with_grad(self, E):
                return E.mean(0).square().sum(), 2 * E.mean(0) / E.shape[0]
        """, "loss_term_with_grad needs beside it a loss_term"),
    "logit_cap that disagrees": (_softcap_with_cap("60.0"), "logit_cap 60 disagrees with transform_logits"),
    "logit_cap as a tensor": (_softcap_with_cap("torch.tensor(30.0)"), "logit_cap must return the cap c"),
    "logit_cap alone": (_softcap_with_cap("30.0", transform=False), "logit_cap needs transform_logits beside it"),
    "in-place edit of logits": ("""
        @dataclass(frozen=True)
        class P(Stabilizer):
            def transform_logits(self, logits):
                return logits.clamp_(-5, 5)
        """, "in place"),
    "non-finite loss": ("""
        @dataclass(frozen=True)
        class P(Stabilizer):
            def loss_term(self, inputs):
                return inputs.lse.mean() * float("nan")
        """, "non-finite"),
    "exception in a hook": ("""
        @dataclass(frozen=True)
        class P(Stabilizer):
            def loss_term(self, inputs):
                return inputs.logits @ inputs.hidden
        """, "loss_term raised RuntimeError"),
}


@pytest.mark.parametrize("case", list(PLUGINS))
def test_a_faulty_plug_in_is_one_line_naming_it_and_the_fault(capsys, tmp_path, case):
    body, words = PLUGINS[case]
    plugin = tmp_path / "faulty.py"
    plugin.write_text("from dataclasses import dataclass\nfrom bench.stabilizers import OUTPUT_EMBEDDING, Stabilizer\n"
                      + textwrap.dedent(body))
    spec = f"{plugin}:P"
    line = refused(capsys, [*RUN, "--data", "synthetic:tokens=5000", "--stabilizer", spec, "--out", tmp_path / "o"],
                   "faulty", words)
    assert "stabilizer" in line
    refused_sweep(capsys, tmp_path, sweep_file(tmp_path, stabilizers=f'"{spec}" = {{}}'), "faulty", words)


def test_a_plug_in_whose_loss_term_with_grad_agrees_passes_the_preflight(tmp_path):
    """The same plug-in as the faulty cases, with the right gradient 2μ/V: no error; and a run trains with it."""
    from bench.model import preset
    from bench.stabilizers import make_stabilizer
    from bench.stabilizers.preflight import preflight
    plugin = tmp_path / "good.py"
    plugin.write_text("from dataclasses import dataclass\nfrom bench.stabilizers import Stabilizer\n"
                      + textwrap.dedent(_muloss_with_grad("2 * mu / V")))
    spec = f"{plugin}:P"
    preflight(spec, make_stabilizer(spec), preset("nano", vocab_size=97, seq_len=8, weight_tying=True))
    assert main([*RUN, "--data", "synthetic:tokens=5000", "--stabilizer", spec, "--out", str(tmp_path / "o")]) == 0


def test_a_plug_in_whose_logit_cap_agrees_passes_the_preflight_and_trains(tmp_path):
    """The soft-capping plug-in of the faulty cases with its true cap 30 (and an int 30, a number too)."""
    from bench.model import preset
    from bench.stabilizers import make_stabilizer
    from bench.stabilizers.preflight import preflight
    for cap in ("30.0", "30"):
        plugin = tmp_path / f"good{cap.replace('.', '_')}.py"
        plugin.write_text("from dataclasses import dataclass\nfrom bench.stabilizers import Stabilizer\n"
                          + textwrap.dedent(_softcap_with_cap(cap)))
        spec = f"{plugin}:P"
        preflight(spec, make_stabilizer(spec), preset("nano", vocab_size=97, seq_len=8, weight_tying=True))
    assert main([*RUN, "--data", "synthetic:tokens=5000", "--stabilizer", spec, "--out", str(tmp_path / "o")]) == 0


def test_hooks_are_also_checked_on_every_call_without_a_sync():
    """The per-call structural check in apply.py (what training runs; preflight aside)."""
    from bench.stabilizers.apply import apply_after_step, embedding_term, hooked_cross_entropy
    E = torch.randn(8, 4)
    with pytest.raises(StabilizerError, match="'mine': after_step must return .* shape \\(8, 4\\)"):
        apply_after_step(lambda p: {"E": p["E"].mean(0)}, {"E": E}, "E", "mine")
    with pytest.raises(StabilizerError, match="'mine': after_step_delta must return .* broadcasts to \\(8, 4\\)"):
        apply_after_step(None, {"E": E}, "E", "mine", delta=lambda p: {"E": p["E"].mean(1)})
    with pytest.raises(StabilizerError, match="'mine': loss_term_with_grad must return a scalar loss first"):
        embedding_term(lambda E_: (E_.sum(0), E_), "mine")(E)
    with pytest.raises(StabilizerError, match="'mine': loss_term_with_grad edited its input"):
        embedding_term(lambda E_: (E_.mul_(2).sum(), E_), "mine")(E)
    logits = torch.randn(2, 3, 8)
    with pytest.raises(StabilizerError, match="loss_term must return a scalar"):
        hooked_cross_entropy(logits, torch.zeros(2, 3, dtype=torch.long), torch.randn(2, 3, 4), E, None,
                             lambda lt, lse, h, E_: lse, "mine")


# -- cause 11: small ones -------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["300-character name", "binary sweep file", "FIFO as sweep file",
                                  "binary config file", "FIFO as text: path"])
def test_small_inputs_that_gave_tracebacks_or_hung(capsys, tmp_path, case):
    if case == "300-character name":
        refused_sweep(capsys, tmp_path, sweep_file(tmp_path, name="n" * 300), "name", "at most 100 characters, got 300")
    elif case == "binary sweep file":
        (tmp_path / "sweep.toml").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
        refused_sweep(capsys, tmp_path, tmp_path / "sweep.toml", "sweep.toml", "UTF-8")
    elif case == "FIFO as sweep file":
        os.mkfifo(tmp_path / "sweep.toml")
        refused_sweep(capsys, tmp_path, tmp_path / "sweep.toml", "sweep.toml", "not a regular file")
    elif case == "binary config file":
        (tmp_path / "run.toml").write_bytes(b"\xff\xfe\x00\x01")
        refused(capsys, [*RUN, "--config", tmp_path / "run.toml", "--out", tmp_path / "o"], "run.toml", "UTF-8")
    else:
        os.mkfifo(tmp_path / "corpus.txt")
        refused(capsys, [*RUN, "--data", f"text:{tmp_path / 'corpus.txt'}", "--out", tmp_path / "o"],
                "corpus.txt", "regular file")


def test_sweep_json_is_written_only_after_everything_was_checked(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "sweep.json").write_text('{"name": "an earlier sweep"}\n')
    path = sweep_file(tmp_path)
    (tmp_path / "a-directory").mkdir()
    refused(capsys, ["sweep", path, "--out", out, "--workers", "1", "--storage", tmp_path / "a-directory"], "storage")
    assert (out / "sweep.json").read_text() == '{"name": "an earlier sweep"}\n'
    assert not (out / "sweep.toml").exists()


def test_a_step_too_large_for_the_machine_names_the_micro_batch_that_fits():
    from bench.memory import estimate_step_bytes, fit_micro_batch
    cfg = RunConfig(model="micro", vocab_size=8192, seq_len=64, batch_size=64, head_chunk=0)
    one = estimate_step_bytes(cfg.replace(micro_batch_size=8))
    assert fit_micro_batch(cfg, one) == 8  # the largest divisor of 64 whose step fits
    assert fit_micro_batch(cfg, one - 1) == 4
    assert fit_micro_batch(cfg, 1000) is None


def test_the_auto_pack_size_is_capped_by_memory():
    from bench.memory import estimate_step_bytes
    from bench.pack import auto_pack_size
    from bench.pack.grouping import AUTO_K_CPU, PACK_MEMORY_FRACTION
    cfg = RunConfig(model="micro", device="cpu")
    per = estimate_step_bytes(cfg)
    assert auto_pack_size(cfg, device_bytes=10**15) == AUTO_K_CPU
    assert auto_pack_size(cfg, device_bytes=int(3 * per / PACK_MEMORY_FRACTION) + 1) == 3
    assert auto_pack_size(cfg, device_bytes=1) == 1
