"""Packed training: K compatible sweep points trained as one model stacked along a member dim.

- ``PackModule(cfgs)``: the training module of a pack (module.py), driven by the one loop
  ``bench.trainer.train_members`` — ``train_pack`` is that loop, named for packs;
- ``pack_key(cfg)`` / ``group_into_packs(cfgs, k)``: which configs can share a pack
  (grouping.py);
- ``measure_pack_throughput(...)``: trials/hour packed vs unpacked (throughput.py).

Inside: batched_model.py (the GPT as a function of stacked parameters), store.py (the
members' parameters as rows of one flat buffer), optim.py (AdamW + clipping per row),
hooks.py (stabilizer hooks vmapped over per-member hyperparameters), step.py (one step's
gradients: batched body, the loss head member by member).
"""
from ..trainer import train_members as train_pack
from .grouping import SHARED_FIELDS, auto_pack_size, group_into_packs, pack_key

__all__ = ["train_pack", "pack_key", "group_into_packs", "auto_pack_size", "SHARED_FIELDS",
           "measure_pack_throughput"]


def __getattr__(name):
    if name == "measure_pack_throughput":
        from .throughput import measure_pack_throughput
        return measure_pack_throughput
    raise AttributeError(name)
