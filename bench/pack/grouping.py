"""Which sweep points can share a pack, and how a list of them is cut into packs.

Members of a pack share one forward pass structure, one batch per step and one
logging/evaluation schedule; they may differ in everything a member owns: ``lr``,
``min_lr``, stabilizer hyperparameters, ``seed`` (initialization), AdamW's betas / eps /
weight decay, ``grad_clip``, the divergence rules and the sweep name.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Hashable

from ..config import RunConfig, fields_with

# RunConfig fields that must be equal within a pack (besides the resolved data seed), in the
# order of their ``pack_shared`` rank: architecture; data and schedule length; what is recorded
# when; numerics and hook code; how the one process runs.
SHARED_FIELDS: tuple[str, ...] = tuple(f.name for f in fields_with(flag="pack_shared"))

# Pack size chosen by ``k="auto"``: measured on a 2-core AVX2 CPU (see bench/pack/throughput.py);
# larger packs only add memory once the cores are busy.
AUTO_K_CPU = 8
# Not measured where packs should pay on a GPU (members too small to fill it). At the study's 16M with
# 16 x 2048 tokens per member an H200 gave packs of 4 / 8 / 16 0.91x / 0.88x / 1.02x the trials/hour of
# one trial at a time (results/perf/gpu-nvidia-h200.json): such a member's step already fills the GPU
# (its loss head is memory-bound), so the paper sweep does not pack.
AUTO_K_CUDA = 32


def pack_key(cfg: RunConfig) -> tuple[Hashable, ...]:
    """Configs with equal keys can be trained as members of one pack (``train_pack``)."""
    return tuple(getattr(cfg, f) for f in SHARED_FIELDS) + (cfg.resolved_data_seed,)


PACK_MEMORY_FRACTION = 0.8
"""Share of the device's memory a pack may plan to use (the rest: allocator slack, CUDA context)."""


def auto_pack_size(cfg: RunConfig, device_bytes: int | None = None) -> int:
    """K for ``pack = "auto"``: AUTO_K_CUDA (CUDA) or AUTO_K_CPU, capped by memory: at most as many
    members as fit ``PACK_MEMORY_FRACTION`` of the device's memory (``device_bytes``, default this
    machine's, ``bench.memory.machine_bytes``) at ``estimate_step_bytes`` each — every member has its
    own weights, AdamW state and activations; the head's logits are counted once per member too,
    a bound above what a pack's head holds (one member's chunk at a time). At least 1."""
    from ..memory import estimate_step_bytes, machine_bytes

    cap = AUTO_K_CUDA if cfg.device == "cuda" else AUTO_K_CPU
    if device_bytes is None:
        have = machine_bytes(cfg.device) if cfg.device != "cuda" or _cuda() else None
        device_bytes = have[0] if have else None
    if device_bytes is None:  # the device is not here (a login node): the cap alone
        return cap
    return max(1, min(cap, int(PACK_MEMORY_FRACTION * device_bytes // max(estimate_step_bytes(cfg), 1))))


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def group_into_packs(cfgs: list[RunConfig], k: int | str = "auto") -> list[list[RunConfig]]:
    """Group compatible configs (equal ``pack_key``) into packs of at most ``k`` members.

    Order is kept: packs appear in the order of their first config, members in input order.
    A group of n configs becomes ceil(n / k) packs of near-equal size (10 with k = 8:
    5 + 5, not 8 + 2), since a pack's step costs about the same per member at any K.
    ``k = "auto"`` picks ``auto_pack_size``; ``k = 1`` gives one config per pack.
    """
    groups: OrderedDict[tuple, list[RunConfig]] = OrderedDict()
    for c in cfgs:
        groups.setdefault(pack_key(c), []).append(c)
    packs = []
    for members in groups.values():
        size = auto_pack_size(members[0]) if k == "auto" else int(k)
        if size < 1:
            raise ValueError(f"pack size must be >= 1 or 'auto', got {k!r}")
        n_packs = math.ceil(len(members) / size)
        base, extra = divmod(len(members), n_packs)
        start = 0
        for i in range(n_packs):
            n = base + (i < extra)
            packs.append(members[start:start + n])
            start += n
    return packs


def describe_mismatch(cfgs: list[RunConfig]) -> str:
    """Human-readable list of shared fields on which ``cfgs`` disagree ('' if none)."""
    bad = [f for f in SHARED_FIELDS if len({getattr(c, f) for c in cfgs}) > 1]
    if len({c.resolved_data_seed for c in cfgs}) > 1:
        bad.append("data seed (data_seed, or seed when data_seed is unset)")
    return ", ".join(bad)
