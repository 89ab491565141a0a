"""Run configuration: one plain dataclass, validated by pydantic when it comes from TOML or the CLI.

Every field has a default, so ``RunConfig()`` is a valid micro run on synthetic data.
``key()`` is a stable hash of the fields that define *what* is trained (not how or
where), used as run id and as the sweep engine's trial key.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import pydantic
from pydantic import ConfigDict, TypeAdapter

from .errors import ConfigError
from .presets import ARCH_VERSION, PRESETS, ModelConfig, preset

DEFAULT_HEAD_CHUNK = 256
"""Tokens per chunk of the loss head (``RunConfig.head_chunk``, ``bench.head``), chosen on CPU
(README "Performance"): 256 × V fp32 logits are 8 MiB at V = 8192, and the chunk's passes find
them in cache. Measured on a Xeon, one and two threads: a ``micro`` step (512 tokens) 6–9 % faster
than with 1024; at 16M (H = 224, V = 50,304) within the noise of 1024 and 512 (0.94–1.19×).
A run on CUDA that sets no ``head_chunk`` gets ``DEFAULT_HEAD_CHUNK_CUDA`` (``from_dict``)."""

DEFAULT_HEAD_CHUNK_CUDA = 4096
"""Tokens per chunk of the loss head for a run on CUDA that sets none: 4096 × 50,304 fp32 logits are
0.8 GiB per buffer. Measured on an H200 (bf16, 16 × 2048 tokens, V = 50,304; results/perf/gpu-nvidia-h200*):
eager steps against the unchunked head 0.66× / 0.81× / 0.88× / 0.90× at 16M and 0.85× / 0.94× / 0.97× /
0.98× at 221M for chunks of 256 / 1024 / 4096 / 16384 tokens; compiled at 221M 0.87× with 256 and 1.04×
with 4096 (1.07× at 109M), the step's peak memory 25.2 against 41.8 GiB."""


def machine_device(device: str) -> str:
    """``device`` as this machine runs it: "auto" → "cuda" where CUDA is available, else "cpu"; others as given."""
    if device != "auto":
        return device
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


Precision = Literal["auto", "fp32", "bf16", "bf16-emu", "fp64"]
"""A run's numeric precision (see ``bench.precision``)."""


Role = Literal["run", "execution"]
"""A field's role: ``run`` defines what is trained (in the key); ``execution`` how or where (not)."""
KeyRule = Literal["always", "if_not_default"]
"""How a run field enters the key: ``always`` (the fields of key version 2, which came with
``arch_version`` 2 and changed every key; no new field may take it, it would change every key
again) or ``if_not_default`` (only when it differs from its default)."""
RuleMode = Literal["stop", "record", "off"]
"""What a divergence rule does when it fires: stop the run (``diverged``), only record the first
step it fired (``divergence_events``), or nothing."""
FLAGS = ("pack_shared", "axis", "cli")
"""Optional metadata flags: ``pack_shared`` (int: rank in ``pack_key``; must be equal within a pack),
``axis`` (str: where a sweep file sets it instead of ``[train]``), ``cli`` (int: rank of its
``stabench run`` flag ``--name-with-dashes``; the flag's type is the field's)."""


def run_field(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING,
              key: KeyRule = "if_not_default", **flags: Any) -> Any:
    """A field that defines what is trained (part of ``RunConfig.key()`` by rule ``key``)."""
    return _field("run", default, factory, key=key, **flags)


def execution_field(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, **flags: Any) -> Any:
    """A field that says how or where a run is trained (never part of the key)."""
    return _field("execution", default, factory, **flags)


def _field(role: Role, default: Any, factory: Any, **meta: Any) -> Any:
    unknown = set(meta) - {"key", *FLAGS}
    if unknown:
        raise TypeError(f"unknown field metadata {sorted(unknown)}; allowed: key, {', '.join(FLAGS)}")
    return field(default=default, default_factory=factory, metadata={"role": role, **meta})


@dataclass(frozen=True)
class DivergenceConfig:
    """The divergence rules, each ``stop`` (the run stops and counts as diverged, with the reason),
    ``record`` (the run goes on; the first step the rule fired is recorded) or ``off``:

    - ``nonfinite``: a non-finite loss or gradient norm;
    - ``loss_above_L0``: after warmup, train loss above L0 + ``loss_margin`` nats (L0 = ln V);
    - ``spike``: train loss above the mean of the previous ``spike_window`` steps by more than
      ``spike_sigma`` standard deviations *and* by more than ``spike_min_jump`` nats
      (OLMo-core's stability monitor uses 6σ over 128 steps; the absolute floor keeps the
      noise of tiny models from counting). The largest z-score seen is recorded as
      ``spike_score`` in every mode.

    Every rule that fired, in any mode but ``off``, is in the run's ``divergence_events``.
    The study stops no run early: its protocol is ``nonfinite = "stop"`` and the others ``record``
    (``sweeps/paper-wortsman.toml``). Its fields are hashed into ``RunConfig.key()`` by the
    same rules as RunConfig's.
    """

    __pydantic_config__ = ConfigDict(extra="forbid")

    loss_margin: float = run_field(1.0, key="always")
    spike_sigma: float = run_field(6.0, key="always")
    spike_window: int = run_field(128, key="always")
    spike_min_jump: float = run_field(1.0, key="always")
    nonfinite: RuleMode = run_field("stop", key="always")
    loss_above_L0: RuleMode = run_field("stop", key="always")
    spike: RuleMode = run_field("stop", key="always")

    RULES: ClassVar[tuple[str, ...]] = ("nonfinite", "loss_above_L0", "spike")
    MIN_SPIKE_WINDOW: ClassVar[int] = 8  # the spike test needs this many previous steps

    def check(self, source: str | None = None) -> "DivergenceConfig":
        """Raise ConfigError (key ``divergence.<field>``) for values the monitor cannot use."""
        _check_finite(self, "divergence.", source)
        for k in ("loss_margin", "spike_sigma"):
            if not getattr(self, k) > 0:
                raise ConfigError(f"divergence.{k}", f"must be a finite number > 0, got {getattr(self, k)!r}", source)
        if not self.spike_min_jump >= 0:
            raise ConfigError("divergence.spike_min_jump", f"must be a finite number >= 0, got {self.spike_min_jump!r}",
                              source)
        if self.spike_window < self.MIN_SPIKE_WINDOW:
            raise ConfigError("divergence.spike_window", f"must be an integer >= {self.MIN_SPIKE_WINDOW} (steps the "
                              f"spike test averages over), got {self.spike_window!r}", source)
        return self


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines one training run. Units: lr per step; lengths in tokens.

    Each field declares its role in its metadata (``run_field`` / ``execution_field``);
    ``fields_with`` derives from it the execution fields, the sweep axes and [train] keys
    (``bench.sweep.spec``), the pack-shared fields (``bench.pack.grouping``) and the
    ``stabench run`` flags (``bench.run_cli``).

    Adding a field: give it a default that reproduces today's behaviour, and declare it with
    ``run_field(default)`` if it changes what is trained (it then enters ``key()`` only when
    it differs from its default, so every existing key stays valid; never ``key="always"``),
    else ``execution_field(default)``. Add ``pack_shared=N`` if pack members must agree on it,
    ``axis="..."`` if a sweep sets it outside [train], ``cli=N`` for a ``stabench run`` flag.
    """

    __pydantic_config__ = ConfigDict(extra="forbid")

    # what is trained
    model: str = run_field("micro", key="always", axis="[grid] as models = [...]", pack_shared=0, cli=0)
    arch_version: int = run_field(ARCH_VERSION, key="always", pack_shared=17)  # bench.model's; only the current one trains
    stabilizer: str = run_field("baseline", key="always", axis="[stabilizers]", pack_shared=12, cli=1)
    hparams: dict[str, float] = run_field(factory=dict, key="always",  # e.g. {"lam": 1e-4} or {"cap": 30}
                                          axis="[stabilizers] as <stabilizer>.<name> = [...]")
    weight_tying: bool = run_field(False, key="always", axis="[grid] as weight_tying = [...]", pack_shared=3)
    lr: float = run_field(3e-3, key="always", axis="[grid] as lr = [...]", cli=2)
    min_lr: float = run_field(1e-5, key="always", cli=3)
    warmup: int = run_field(100, key="always", pack_shared=7, cli=5)
    steps: int = run_field(500, key="always", pack_shared=6, cli=4)
    batch_size: int = run_field(8, key="always", pack_shared=5, cli=6)
    seq_len: int = run_field(64, key="always", pack_shared=2, cli=8)
    vocab_size: int = run_field(8192, key="always", pack_shared=1, cli=9)
    data: str = run_field("synthetic", key="always", pack_shared=4, cli=10)
    seed: int = run_field(1, key="always", axis="[grid] as seeds = [...]", cli=11)
    data_seed: int | None = run_field(None, key="always", cli=12)  # batch order; None = same as seed
    beta1: float = run_field(0.9, key="always")
    beta2: float = run_field(0.95, key="always")
    eps: float = run_field(1e-8, key="always")
    weight_decay: float = run_field(0.0, key="always", cli=19)
    grad_clip: float = run_field(1.0, key="always", cli=20)
    precision: Precision = run_field("auto", key="always", pack_shared=11, cli=14)
    eval_every: int = run_field(100, key="always", pack_shared=8, cli=16)
    eval_batches: int = run_field(4, key="always", pack_shared=9, cli=17)  # periodic evaluations
    final_eval_batches: int | None = run_field(None, pack_shared=18)  # the final evaluation; None = eval_batches
    divergence: DivergenceConfig = run_field(factory=DivergenceConfig, key="always")
    tf32: bool = run_field(False, pack_shared=19)  # CUDA only: TF32 fp32 matmuls (the study's); no effect on CPU
    # how and where it is trained (not part of the key)
    sweep: str = execution_field("", axis="the top-level name")
    log_every: int = execution_field(10, pack_shared=10, cli=18)
    micro_batch_size: int | None = execution_field(None, pack_shared=13, cli=7)  # grad. accumulation; None = batch_size
    device: Literal["auto", "cpu", "cuda"] = execution_field("auto", pack_shared=14, cli=13)
    compile: bool = execution_field(False, pack_shared=16)  # a pack compiles its batched forward or not
    # tokens per chunk of the loss head (bench.head): the (B·T × V) logits are never held at once;
    # 0 = the unchunked head. Same arithmetic up to rounding (as threads); a pack runs it member by member.
    # Default 256 (DEFAULT_HEAD_CHUNK); 4096 for a run on CUDA that sets none (DEFAULT_HEAD_CHUNK_CUDA, from_dict).
    head_chunk: int = execution_field(DEFAULT_HEAD_CHUNK, pack_shared=20)
    # AdamW's kernel in a single run: torch's fused kernel (one pass over each parameter; default) or its
    # multi-tensor path (bit for bit the for-loop; the kernel of runs recorded before this field, see
    # ``upgrade_stored``). Same arithmetic up to rounding. Packs use their own row-wise AdamW (bench.pack.optim).
    adamw: Literal["fused", "foreach"] = execution_field("fused")
    # the library of a CPU run's fp32 products (bench.gemm): oneDNN's matmul or ATen's mm (MKL on x86-64,
    # which takes its AVX2 path on AMD CPUs; the kernels of runs recorded before this field, see
    # ``upgrade_stored``); "auto" = oneDNN where this PyTorch has it on an x86-64 CPU. Same sums up to their
    # order. A pack's loss head too (its batched body keeps ATen's products); CUDA runs, compiled graphs and
    # other dtypes are unaffected.
    cpu_gemm: Literal["auto", "aten", "onednn"] = execution_field("auto", pack_shared=21)
    threads: int | None = execution_field(None, pack_shared=15, cli=15)
    log: Literal["none", "tensorboard", "wandb", "mlflow"] = execution_field("none", cli=21)  # bench.tracking

    EXECUTION_FIELDS: ClassVar[tuple[str, ...]] = ()  # set below the class, from the metadata

    # -- derived -------------------------------------------------------------
    def model_config(self) -> ModelConfig:
        return preset(self.model, vocab_size=self.vocab_size, seq_len=self.seq_len,
                      weight_tying=self.weight_tying)

    @property
    def resolved_final_eval_batches(self) -> int:
        """Validation batches of the final evaluation (``final_eval_batches``, else ``eval_batches``)."""
        return self.eval_batches if self.final_eval_batches is None else self.final_eval_batches

    @property
    def resolved_data_seed(self) -> int:
        return self.seed if self.data_seed is None else self.data_seed

    @property
    def L0(self) -> float:
        """Loss of a uniform prediction, ln V (nats)."""
        return math.log(self.vocab_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def resolved_precision(self) -> str:
        """``precision`` with "auto" resolved for ``device`` ("auto": this machine's, CUDA if it has
        one), as training resolves it: bf16 on CUDA and on CPUs with native bf16, else fp32."""
        if self.precision != "auto":
            return self.precision
        import torch

        from .precision import resolve_precision
        return resolve_precision("auto", torch.device(machine_device(self.device)))

    def key(self) -> str:
        """16-hex-digit hash of the run fields (execution fields excluded; see ``_key_dict``), with
        the precision resolved (``resolved_precision``): an "auto" run trained in fp32 on a CPU and
        one trained in bf16 on a GPU are different runs, with different keys and checkpoints."""
        d = _key_dict(self)
        d["precision"] = self.resolved_precision
        d["hparams"] = {k: float(v) for k, v in sorted(d["hparams"].items())}
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def replace(self, **changes: Any) -> "RunConfig":
        return from_dict({**self.to_dict(), **changes})

    # -- semantic checks beyond types -------------------------------------------
    MAX_VOCAB: ClassVar[int] = 1 << 32  # token ids are stored as uint32
    MAX_SEED: ClassVar[int] = (1 << 63) - 1  # torch.manual_seed and numpy's default_rng both take it

    def check(self, source: str | None = None, machine: bool = True) -> "RunConfig":
        """Raise ConfigError for values that are well-typed but unusable; returns self.

        Everything a run would otherwise find out later is checked here, once, before training:
        ranges of every field (all floats finite), the stabilizer (built, and a plug-in's hooks run
        once on small tensors: ``bench.stabilizers.preflight``), the data (every file's header,
        size and token-id range: ``bench.data.check_data_spec``) and, with ``machine``, that this
        machine can run it (the device exists; one step fits in memory: ``bench.memory``).
        ``machine=False`` skips the last two (a launcher validating a sweep for other machines).
        """
        from .data import DataError, check_data_spec
        from .stabilizers import StabilizerError, make_stabilizer
        from .stabilizers.preflight import preflight

        def fail(key: str, msg: str) -> None:
            raise ConfigError(key, msg, source)

        if self.model not in PRESETS:
            fail("model", f"unknown preset {self.model!r}; allowed: {', '.join(PRESETS)}")
        if self.arch_version != ARCH_VERSION:
            fail("arch_version", f"this stabench trains architecture version {ARCH_VERSION} only, got "
                 f"{self.arch_version!r} (older versions' results stay readable; bench/presets.py lists them)")
        _check_finite(self, "", source)
        positive = {"lr": self.lr, "steps": self.steps, "batch_size": self.batch_size,
                    "seq_len": self.seq_len, "vocab_size": self.vocab_size, "eval_every": self.eval_every,
                    "eval_batches": self.eval_batches, "log_every": self.log_every,
                    "final_eval_batches": self.resolved_final_eval_batches}
        for k, v in positive.items():
            if not (v > 0 and math.isfinite(v)):
                fail(k, f"must be > 0, got {v!r}")
        if not 2 <= self.vocab_size <= self.MAX_VOCAB:
            fail("vocab_size", f"must be in [2, 2**32] (tokens are uint32), got {self.vocab_size!r}")
        for k in ("seed", "data_seed"):
            v = getattr(self, k)
            if v is not None and not 0 <= v <= self.MAX_SEED:
                fail(k, f"must be an integer in [0, 2**63 - 1], got {v!r}")
        for k in ("min_lr", "warmup", "weight_decay", "grad_clip", "eps"):
            if not getattr(self, k) >= 0:
                fail(k, f"must be >= 0, got {getattr(self, k)!r}")
        for k in ("beta1", "beta2"):
            if not 0 <= getattr(self, k) < 1:
                fail(k, f"must be in [0, 1), got {getattr(self, k)!r}")
        if self.warmup >= self.steps:
            fail("warmup", f"must be < steps ({self.steps}), got {self.warmup}")
        mb = self.micro_batch_size
        if mb is not None and (mb <= 0 or self.batch_size % mb):
            fail("micro_batch_size", f"must divide batch_size={self.batch_size}, got {mb}")
        if self.threads is not None and self.threads <= 0:
            fail("threads", f"must be >= 1, got {self.threads}")
        if isinstance(self.head_chunk, bool) or self.head_chunk < 0:
            fail("head_chunk", f"must be an integer >= 0 (tokens per chunk of the loss head; 0 = unchunked), "
                               f"got {self.head_chunk!r}")
        if self.model_config().n_embd % self.model_config().n_head:
            fail("model", "width not divisible by heads")
        self.divergence.check(source)
        if machine:
            from .memory import check_memory, device_available
            if not device_available(self.device):
                fail("device", f"{self.device!r} is not available on this machine; allowed here: auto, cpu")
            check_memory(self, source)
            from .gemm import onednn_available
            if self.cpu_gemm == "onednn" and machine_device(self.device) == "cpu" and not onednn_available():
                fail("cpu_gemm", "oneDNN's fp32 matmul is not available in this PyTorch on this machine; "
                                 "allowed here: auto, aten")
        try:
            stab = make_stabilizer(self.stabilizer, **self.hparams)
            preflight(self.stabilizer, stab, self.model_config())
        except StabilizerError as e:
            fail("stabilizer", str(e))
        try:
            check_data_spec(self.data, vocab_size=self.vocab_size, seq_len=self.seq_len)
        except DataError as e:
            fail("data", str(e))
        from .tracking import check_tracker
        if (why := check_tracker(self.log)) is not None:
            fail("log", why)
        return self


def _float_fields(cls: type) -> tuple[str, ...]:
    """Names of the fields of dataclass ``cls`` annotated ``float`` (or ``float | None``)."""
    hints = typing.get_type_hints(cls)
    return tuple(f.name for f in dataclasses.fields(cls)
                 if hints[f.name] is float or hints[f.name] == float | None)


def _check_finite(obj: Any, prefix: str, source: str | None) -> None:
    """Every float field of dataclass ``obj`` is finite (no inf, no NaN), else ConfigError."""
    for name in _float_fields(type(obj)):
        v = getattr(obj, name)
        if v is not None and not math.isfinite(v):
            raise ConfigError(prefix + name, f"must be a finite number, got {v!r}", source)


def fields_with(role: Role | None = None, flag: str | None = None,
                of: type = RunConfig) -> tuple[dataclasses.Field, ...]:
    """Fields of ``of`` with this role and/or flag: in field order, or by rank for a ranked flag."""
    if flag is not None and flag not in FLAGS:
        raise ValueError(f"unknown flag {flag!r}; allowed: {', '.join(FLAGS)}")
    out = [f for f in dataclasses.fields(of) if (role is None or f.metadata["role"] == role)
           and (flag is None or f.metadata.get(flag) is not None)]
    if flag is not None and all(isinstance(f.metadata[flag], int) for f in out):
        out.sort(key=lambda f: f.metadata[flag])
    return tuple(out)


RunConfig.EXECUTION_FIELDS = tuple(f.name for f in fields_with(role="execution"))


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _key_dict(obj: Any) -> dict[str, Any]:
    """The run fields of dataclass ``obj`` that enter the key (nested dataclasses alike).

    ``key="always"`` fields are always there; ``key="if_not_default"`` ones only when they
    differ from their default, so adding such a field keeps every existing key.
    """
    out = {}
    for f in dataclasses.fields(obj):
        if f.metadata["role"] != "run":
            continue
        value = getattr(obj, f.name)
        if f.metadata["key"] == "if_not_default" and value == _default(f):
            continue
        out[f.name] = _key_dict(value) if dataclasses.is_dataclass(value) else copy.deepcopy(value)
    return out


def protocol(cfg: RunConfig, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """What a sweep's runs share: the key's fields minus the grid axes (``axis`` metadata: model,
    lr, seed, tying, stabilizer, hparams) and ``exclude``. Runs of one protocol can be pooled and
    compared; a new field at its default leaves the protocol unchanged, as it leaves the key."""
    axes = {f.name for f in fields_with(flag="axis")} | set(exclude)
    return {k: v for k, v in _key_dict(cfg).items() if k not in axes}


def protocol_fingerprint(proto: dict[str, Any]) -> str:
    """12-hex-digit hash of a ``protocol`` dict."""
    blob = json.dumps(proto, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def protocol_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old → new`` for every protocol key that differs (nested dicts flattened with dots)."""
    def flat(d: dict[str, Any], pre: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{pre}{k}.") if isinstance(v, dict) else {f"{pre}{k}": v})
        return out

    a, b = flat(old), flat(new)
    return [f"{k}: {a.get(k, '(default)')!r} → {b.get(k, '(default)')!r}" for k in sorted(set(a) | set(b))
            if a.get(k, "(default)") != b.get(k, "(default)")]


_ADAPTER = TypeAdapter(RunConfig)


def _strict_model(cls: type) -> type[pydantic.BaseModel]:
    """A pydantic model with the fields and types of dataclass ``cls`` (nested ones alike), in
    strict mode: ``"12"`` is no integer, ``true`` no number, ``"yes"`` no boolean (an integer is
    still a valid float). It only checks types; the dataclass itself is built by ``_ADAPTER``.
    (Pydantic's strict mode on the dataclass would refuse a dict for it.)"""
    hints = typing.get_type_hints(cls)
    fields = {f.name: (_strict_model(hints[f.name]) if dataclasses.is_dataclass(hints[f.name]) else hints[f.name],
                       None) for f in dataclasses.fields(cls)}
    return pydantic.create_model(f"{cls.__name__}Types", __config__=ConfigDict(extra="forbid", strict=True),
                                 **fields)


_STRICT = _strict_model(RunConfig)


def _format_pydantic(err: pydantic.ValidationError, source: str | None) -> ConfigError:
    e = err.errors()[0]
    loc = [p for p in e["loc"] if not (isinstance(p, str) and p in ("int", "float", "none"))]  # union members
    key = ".".join(str(p) for p in loc) or "(root)"
    msg = e["msg"]
    if e["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        cls = DivergenceConfig if loc[0] == "divergence" else RunConfig
        allowed = [f.name for f in dataclasses.fields(cls)]
        msg = f"unknown key; allowed: {', '.join(allowed)}"
    elif "input" in e and not isinstance(e["input"], dict):
        value = e["input"]
        msg = f"{msg}, got {value!r} ({type(value).__name__}); values are not converted"
    return ConfigError(key, msg, source)


def from_dict(d: dict[str, Any], source: str | None = None) -> RunConfig:
    """Validate a plain dict (from TOML or CLI) into a RunConfig; raises ConfigError.

    Types are strict: a string is not read as a number nor a number as a boolean (an integer
    is accepted for a float field). Values are checked by ``RunConfig.check``. A run on CUDA
    (``device = "cuda"``, or "auto" where this machine has CUDA) that sets no ``head_chunk`` gets
    ``DEFAULT_HEAD_CHUNK_CUDA``: the CPU's chunks are too short for a GPU's GEMMs."""
    if "head_chunk" not in d and machine_device(d.get("device", "auto")) == "cuda":
        d = {**d, "head_chunk": DEFAULT_HEAD_CHUNK_CUDA}
    try:
        _STRICT.model_validate(d)
        cfg = _ADAPTER.validate_python(d, strict=False)
    except pydantic.ValidationError as err:
        raise _format_pydantic(err, source) from None
    return cfg


def upgrade_stored(d: dict[str, Any]) -> dict[str, Any]:
    """A config dict as an older stabench stored it (runs.parquet ``config``, a trial's attribute), in
    today's fields: no ``arch_version`` → 1 (the model before issue 14); ``divergence.stop_on_spike``
    → ``divergence.spike`` (``stop`` / ``record``); no ``adamw`` → the kernels the run had before it
    (``_kernels_before_adamw``); no ``cpu_gemm`` → "aten", the products every run had before it. Today's
    dicts pass unchanged."""
    out = dict(d)
    out.setdefault("arch_version", 1)
    if "adamw" not in out:
        out.update(_kernels_before_adamw(out))
    out.setdefault("cpu_gemm", "aten")
    div = out.get("divergence")
    if isinstance(div, dict) and "stop_on_spike" in div:
        div = dict(div)
        div.setdefault("spike", "stop" if div.pop("stop_on_spike") else "record")
        out["divergence"] = div
    return out


def _kernels_before_adamw(d: dict[str, Any]) -> dict[str, Any]:
    """``adamw`` and ``head_chunk`` as a stabench from before ``adamw`` ran the stored config ``d``, so
    that re-training it reproduces its bits where it can: AdamW fused on CUDA, foreach on CPU; and on
    CPU the unchunked head (``head_chunk = 0``) where the run had it (no ``head_chunk``: before the
    chunked head) or where one chunk held a whole micro-batch (that head was then bit for bit the
    unchunked one). A head that took several chunks, and every CUDA run, keep their chunks: the
    unchunked head's memory could not hold them."""
    if machine_device(d.get("device", "auto")) == "cuda":  # and the chunk CUDA runs had then: not today's default
        return {"adamw": "fused", "head_chunk": d.get("head_chunk", DEFAULT_HEAD_CHUNK)}
    tokens = (d.get("micro_batch_size") or d.get("batch_size", 0)) * d.get("seq_len", 0)
    chunk = d.get("head_chunk")
    return {"adamw": "foreach", **({"head_chunk": 0} if chunk is None or chunk >= tokens else {})}


def from_stored(d: dict[str, Any], source: str | None = None) -> RunConfig:
    """``from_dict`` of a stored config of any stabench version (see ``upgrade_stored``); not checked
    (an older architecture version is readable, not trainable)."""
    return from_dict(upgrade_stored(d), source)


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file as data (never executed); errors name the file.

    Only a regular file is read (a FIFO or a device would block or never end), and it must be
    UTF-8 text, as TOML requires."""
    path = Path(path)
    if not path.exists():
        raise ConfigError("(file)", "file not found", str(path))
    if not path.is_file():
        raise ConfigError("(file)", "not a regular file (a directory, FIFO or device); give a .toml file",
                          str(path))
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError("(file)", "file not found", str(path)) from None
    except UnicodeDecodeError as e:
        raise ConfigError("(file)", f"not a UTF-8 text file (byte {e.start}: {e.reason}); TOML files are "
                          "UTF-8 text", str(path)) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("(syntax)", f"not valid TOML: {e}", str(path)) from None
    except OSError as e:
        raise ConfigError("(file)", f"cannot be read: {e.strerror or e}", str(path)) from None
