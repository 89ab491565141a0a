"""Grid expansion: a sweep file becomes trials, each a resolved RunConfig keyed by ``cfg.key()``.

Axes are crossed in this order (the order trials are queued): model × precision (if the
grid names it) × weight tying × seed ×
stabilizer variant (a stabilizer with one point of its hyperparameter grid) × learning rate.
In search mode the learning rate is left to the sampler: the other axes form *variants*,
one Optuna study each.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from ..config import RunConfig, from_dict
from .spec import SweepSpec, hparam_grid

DEFINITION_ATTRS = ("key", "config", "model", "stabilizer", "hparams", "lr", "seed", "weight_tying", "variant")
"""Trial user attributes that define the trial (kept when a trial is retried)."""


@dataclass(frozen=True)
class Variant:
    """Everything of a trial but its learning rate; ``config`` carries a placeholder lr."""

    config: RunConfig
    label: str  # e.g. "nano-zloss(lam=0.0001)-untied-s1"


@dataclass(frozen=True)
class Point:
    """One grid point: the config to train and how it appears in Optuna."""

    config: RunConfig
    variant: str

    @property
    def key(self) -> str:
        return self.config.key()

    def user_attrs(self) -> dict[str, Any]:
        return definition_attrs(self.config, self.variant)


def definition_attrs(cfg: RunConfig, variant: str) -> dict[str, Any]:
    """User attributes that describe a trial (browsable in optuna-dashboard)."""
    return {"key": cfg.key(), "config": cfg.to_dict(), "model": cfg.model, "stabilizer": cfg.stabilizer,
            "hparams": dict(cfg.hparams), "lr": cfg.lr, "seed": cfg.seed, "weight_tying": cfg.weight_tying,
            "variant": variant}


def variants(spec: SweepSpec) -> list[Variant]:
    """Model × weight tying × seed × stabilizer variant, in sweep-file order."""
    out = []
    lr0 = spec.grid.lr[0] if spec.grid.lr else spec.search.lr_min
    precisions = spec.grid.precision or [None]
    for model, prec, tied, seed in itertools.product(spec.grid.models, precisions, spec.grid.weight_tying,
                                                     spec.grid.seeds):
        for stab, grids in spec.stabilizers.items():
            for hps in hparam_grid(grids):
                axes = {"precision": prec} if prec else {}
                cfg = from_dict({**spec.base_config, **axes, "model": model, "weight_tying": tied, "seed": seed,
                                 "stabilizer": stab, "hparams": hps, "lr": lr0})
                hp = ",".join(f"{k}={v:g}" for k, v in hps.items())
                label = (f"{model}-{stab}{f'({hp})' if hp else ''}-{'tied' if tied else 'untied'}"
                         f"{f'-{prec}' if prec else ''}-s{seed}")
                out.append(Variant(cfg, label))
    return out


def expand(spec: SweepSpec) -> list[Point]:
    """All grid points of a grid-mode sweep (variants × lr), keys unique."""
    points, seen = [], set()
    for v in variants(spec):
        for lr in spec.grid.lr or []:
            p = Point(v.config.replace(lr=lr), v.label)
            if p.key not in seen:  # e.g. a duplicated lr value
                seen.add(p.key)
                points.append(p)
    return points


def study_names(spec: SweepSpec) -> list[str]:
    """The Optuna studies of a sweep: one for a grid, one per variant for a search."""
    if spec.mode == "grid":
        return [spec.name]
    return [f"{spec.name}/{v.label}" for v in variants(spec)]


def distributions(spec: SweepSpec) -> dict[str, BaseDistribution]:
    """Optuna distributions of the grid's axes, the same for every trial of the study."""
    lrs, seeds = spec.grid.lr or [spec.search.lr_min, spec.search.lr_max], spec.grid.seeds
    dists: dict[str, BaseDistribution] = {
        "model": CategoricalDistribution(list(dict.fromkeys(spec.grid.models))),
        "stabilizer": CategoricalDistribution(list(spec.stabilizers)),
        "weight_tying": CategoricalDistribution(list(dict.fromkeys(spec.grid.weight_tying))),
        "seed": IntDistribution(min(seeds), max(seeds)),
        "lr": FloatDistribution(min(lrs), max(lrs), log=True),
    }
    values: dict[str, list[float]] = {}
    for grids in spec.stabilizers.values():
        for name, vs in grids.items():
            values.setdefault(name, []).extend(vs)
    for name, vs in values.items():
        dists[param_name(name)] = FloatDistribution(min(vs), max(vs), log=min(vs) > 0)
    return dists


AXIS_PARAMS = ("model", "stabilizer", "weight_tying", "seed", "lr")


def param_name(hparam: str) -> str:
    """Optuna parameter name of a stabilizer hyperparameter (``hp.<name>`` if it clashes with an axis)."""
    return f"hp.{hparam}" if hparam in AXIS_PARAMS else hparam


def point_params(point: Point, dists: dict[str, BaseDistribution]
                 ) -> tuple[dict[str, Any], dict[str, BaseDistribution]]:
    """The trial's parameters (axes and hyperparameters) with their distributions."""
    cfg = point.config
    params: dict[str, Any] = {"model": cfg.model, "stabilizer": cfg.stabilizer, "weight_tying": cfg.weight_tying,
                              "seed": cfg.seed, "lr": cfg.lr,
                              **{param_name(k): v for k, v in cfg.hparams.items()}}
    return params, {k: dists[k] for k in params}
