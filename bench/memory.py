"""What one training step needs in memory, and whether this machine has it (checked before training).

``estimate_step_bytes`` is a closed form from the config alone (nothing is allocated);
``check_memory`` refuses a config whose estimate exceeds the memory of the device it would
run on (``RunConfig.check``), so a vocabulary of 10⁹ or a sequence of 10⁸ is one line naming
the numbers instead of an out-of-memory traceback.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .errors import ConfigError
from .model import count_params

if TYPE_CHECKING:  # pragma: no cover
    from .config import RunConfig

ACTIVATIONS_PER_LAYER_H = 16
"""H-wide values per token and block kept for the backward pass (LayerNorm in/out ×2, q k v,
normalized and rotated q k, attention output, projection, residuals)."""
ACTIVATIONS_PER_LAYER_F = 4
"""F-wide values per token and block (SwiGLU gate and up, the SiLU of the gate, their product)."""
LOGIT_COPIES = 3
"""Float32 (B, T, V) tensors alive at once: the logits, their log-softmax and its gradient."""


def step_terms(cfg: "RunConfig") -> dict[str, int]:
    """The three terms of ``estimate_step_bytes`` (bytes): parameters and AdamW state,
    activations, logits."""
    m = cfg.model_config()
    P = count_params(m)
    s_p = 8 if cfg.precision == "fp64" else 4  # parameters, gradients and AdamW moments
    s_a = {"fp64": 8, "bf16": 2}.get(cfg.precision, 4)  # activations ("auto" counted as fp32)
    N = (cfg.micro_batch_size or cfg.batch_size) * cfg.seq_len  # tokens of one micro-batch
    H, F, L, V = m.n_embd, m.ffn_dim, m.n_layer, m.vocab_size
    return {"parameters and AdamW state": 4 * P * s_p,
            "activations": N * (L * (ACTIVATIONS_PER_LAYER_H * H + ACTIVATIONS_PER_LAYER_F * F) + 2 * H) * s_a,
            "logits": LOGIT_COPIES * N * V * 4}


def estimate_step_bytes(cfg: "RunConfig") -> int:
    """Estimated peak memory of one training step of ``cfg``, in bytes.

    With P = ``count_params`` of the model (V vocabulary, H width, F = SwiGLU width, L layers),
    N = micro-batch × seq_len tokens, s_p = 8 bytes per parameter value for fp64 else 4, and
    s_a = bytes per activation value (8 fp64, 2 bf16, else 4)::

        bytes = 4·P·s_p                         weights, gradients, AdamW exp_avg and exp_avg_sq
              + N·(L·(16·H + 4·F) + 2·H)·s_a    activations saved for the backward pass
              + 3·N·V·4                         float32 logits, their log-softmax and its gradient

    Attention is counted as a fused kernel (no T×T scores), so this is a lower estimate of
    what the step needs: a config above the machine's memory cannot run.
    """
    return sum(step_terms(cfg).values())


def device_available(device: str) -> bool:
    """Whether ``device`` ('auto', 'cpu', 'cuda') can be used in this process."""
    if device != "cuda":
        return True
    import torch
    return torch.cuda.is_available()


def machine_bytes(device: str) -> tuple[int, str] | None:
    """(memory in bytes, its description) of the device ``device`` resolves to; None if unknown."""
    import torch

    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return int(props.total_memory), f"GPU memory ({props.name})"
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "CPU memory"
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return None


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def check_memory(cfg: "RunConfig", source: str | None = None) -> None:
    """Raise ConfigError when one step of ``cfg`` needs more than its device's memory."""
    have = machine_bytes(cfg.device)
    if have is None:
        return
    total, what = have
    terms = step_terms(cfg)
    need = sum(terms.values())
    if need <= total:
        return
    largest = max(terms, key=terms.get)
    key = {"logits": "vocab_size", "activations": "seq_len"}.get(largest, "model")
    parts = ", ".join(f"{k} {_gib(v)}" for k, v in terms.items())
    mb = cfg.micro_batch_size or cfg.batch_size
    raise ConfigError(key, f"one training step needs about {_gib(need)} ({parts}; model {cfg.model!r}, "
                      f"micro-batch {mb} × seq_len {cfg.seq_len} × vocab_size {cfg.vocab_size}), more than "
                      f"this machine's {_gib(total)} of {what}; lower vocab_size, seq_len, batch_size "
                      "(or set micro_batch_size) or use a smaller model", source)
