"""The curve row of one pack member at a logging step: the fields ``train()`` records, in its order.

(The run row is ``trainer.build_run_record``, shared with ``train()``.)
"""
from __future__ import annotations

from typing import Any

from ..config import RunConfig


def curve_row(cfg: RunConfig, step: int, lr: float, train_loss: float, reg_loss: float, grad_norm: float,
              logit_mean: float, logit_absmax: float, mean_log2z: float, mu_norm: float) -> dict[str, Any]:
    return {"run_id": cfg.key(), "step": step, "lr": lr, "train_loss": train_loss, "reg_loss": reg_loss,
            "val_loss": None, "grad_norm": grad_norm, "logit_mean": logit_mean, "logit_absmax": logit_absmax,
            "mean_log2z": mean_log2z, "mu_norm": mu_norm}
