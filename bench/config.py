"""Run configuration: one plain dataclass, validated by pydantic when it comes from TOML or the CLI.

Every field has a default, so ``RunConfig()`` is a valid micro run on synthetic data.
``key()`` is a stable hash of the fields that define *what* is trained (not how or
where), used as run id and as the sweep engine's trial key.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import ConfigDict, TypeAdapter

from .errors import ConfigError
from .model import PRESETS, ModelConfig, preset


Precision = Literal["auto", "fp32", "bf16", "bf16-emu", "fp64"]
"""A run's numeric precision (see ``bench.precision``)."""


@dataclass(frozen=True)
class DivergenceConfig:
    """When a run counts as diverged (it then stops and is recorded with the reason).

    - non-finite loss or gradient norm;
    - after warmup, train loss above L0 + ``loss_margin`` nats (L0 = ln V);
    - a spike: train loss above the mean of the previous ``spike_window`` steps by more than
      ``spike_sigma`` standard deviations *and* by more than ``spike_min_jump`` nats
      (OLMo-core's stability monitor uses 6σ over 128 steps; the absolute floor keeps the
      noise of tiny models from counting). The largest z-score seen is recorded as
      ``spike_score`` either way; set ``stop_on_spike = false`` to only record it.
    """

    __pydantic_config__ = ConfigDict(extra="forbid")

    loss_margin: float = 1.0
    spike_sigma: float = 6.0
    spike_window: int = 128
    spike_min_jump: float = 1.0
    stop_on_spike: bool = True


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines one training run. Units: lr per step; lengths in tokens."""

    __pydantic_config__ = ConfigDict(extra="forbid")

    # what is trained
    model: str = "micro"
    stabilizer: str = "baseline"
    hparams: dict[str, float] = field(default_factory=dict)  # e.g. {"lam": 1e-4} or {"cap": 30}
    weight_tying: bool = False
    lr: float = 3e-3
    min_lr: float = 1e-5
    warmup: int = 100
    steps: int = 500
    batch_size: int = 8
    seq_len: int = 64
    vocab_size: int = 8192
    data: str = "synthetic"
    seed: int = 1
    data_seed: int | None = None  # batch order; None = same as seed
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    precision: Precision = "auto"
    eval_every: int = 100
    eval_batches: int = 4
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)
    # how and where it is trained (not part of the key)
    sweep: str = ""
    log_every: int = 10
    micro_batch_size: int | None = None  # gradient accumulation; None = batch_size
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = False
    threads: int | None = None

    EXECUTION_FIELDS = ("sweep", "log_every", "micro_batch_size", "device", "compile", "threads")

    # -- derived -------------------------------------------------------------
    def model_config(self) -> ModelConfig:
        return preset(self.model, vocab_size=self.vocab_size, seq_len=self.seq_len,
                      weight_tying=self.weight_tying)

    @property
    def resolved_data_seed(self) -> int:
        return self.seed if self.data_seed is None else self.data_seed

    @property
    def L0(self) -> float:
        """Loss of a uniform prediction, ln V (nats)."""
        return math.log(self.vocab_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def key(self) -> str:
        """16-hex-digit hash of the fields that define the run (execution fields excluded)."""
        d = {k: v for k, v in self.to_dict().items() if k not in self.EXECUTION_FIELDS}
        d["hparams"] = {k: float(v) for k, v in sorted(d["hparams"].items())}
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def replace(self, **changes: Any) -> "RunConfig":
        return from_dict({**self.to_dict(), **changes})

    # -- semantic checks beyond types -------------------------------------------
    def check(self, source: str | None = None) -> "RunConfig":
        """Raise ConfigError for values that are well-typed but unusable; returns self."""
        from .data import DataError, check_data_spec
        from .stabilizers import StabilizerError, make_stabilizer

        def fail(key: str, msg: str) -> None:
            raise ConfigError(key, msg, source)

        if self.model not in PRESETS:
            fail("model", f"unknown preset {self.model!r}; allowed: {', '.join(PRESETS)}")
        try:
            make_stabilizer(self.stabilizer, **self.hparams)
        except StabilizerError as e:
            fail("stabilizer", str(e))
        positive = {"lr": self.lr, "steps": self.steps, "batch_size": self.batch_size,
                    "seq_len": self.seq_len, "vocab_size": self.vocab_size, "eval_every": self.eval_every,
                    "eval_batches": self.eval_batches, "log_every": self.log_every}
        for k, v in positive.items():
            if not (v > 0 and math.isfinite(v)):
                fail(k, f"must be > 0, got {v!r}")
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
        if self.model_config().n_embd % self.model_config().n_head:
            fail("model", "width not divisible by heads")
        try:
            check_data_spec(self.data)
        except DataError as e:
            fail("data", str(e))
        return self


_ADAPTER = TypeAdapter(RunConfig)


def _format_pydantic(err: pydantic.ValidationError, source: str | None) -> ConfigError:
    e = err.errors()[0]
    key = ".".join(str(p) for p in e["loc"]) or "(root)"
    msg = e["msg"]
    if e["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        cls = DivergenceConfig if e["loc"][0] == "divergence" else RunConfig
        allowed = [f.name for f in dataclasses.fields(cls)]
        msg = f"unknown key; allowed: {', '.join(allowed)}"
    return ConfigError(key, msg, source)


def from_dict(d: dict[str, Any], source: str | None = None) -> RunConfig:
    """Validate a plain dict (from TOML or CLI) into a RunConfig; raises ConfigError."""
    try:
        cfg = _ADAPTER.validate_python(d, strict=False)
    except pydantic.ValidationError as err:
        raise _format_pydantic(err, source) from None
    return cfg


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file as data (never executed); errors name the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError("(file)", "file not found", str(path)) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("(syntax)", f"not valid TOML: {e}", str(path)) from None
