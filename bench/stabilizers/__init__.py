"""Stabilizers: built-ins, and loading third-party ones by ``module:Class`` or entry point.

A stabilizer is named by a *spec* string:
  - a built-in name: ``baseline``, ``zloss``, ``softcap``, ``muloss``, ``mucentering``;
  - ``package.module:ClassName`` (a module importable from sys.path) or
    ``path/to/file.py:ClassName`` (an explicit file);
  - the name of an entry point in group ``stabench.stabilizers``.
No other code is ever imported.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from ..errors import StabilizerError
from .base import OUTPUT_EMBEDDING, LossInputs, Stabilizer
from .baseline import Baseline
from .mucentering import MuCentering
from .muloss import MuLoss
from .softcap import SoftCap
from .zloss import ZLoss

BUILTIN: dict[str, type[Stabilizer]] = {
    cls.name: cls for cls in (Baseline, ZLoss, SoftCap, MuLoss, MuCentering)
}
ENTRY_POINT_GROUP = "stabench.stabilizers"

__all__ = ["BUILTIN", "OUTPUT_EMBEDDING", "LossInputs", "Stabilizer", "StabilizerError",
           "load_stabilizer_class", "make_stabilizer"]


def _entry_points() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _import_error(module: str, e: BaseException) -> StabilizerError:
    """One line for a plug-in module that fails to import (missing dependency, syntax error, an
    exception in its top-level code)."""
    where = ""
    if isinstance(e, SyntaxError):
        where = f" ({e.filename}, line {e.lineno})"
    return StabilizerError(f"cannot import stabilizer module {module!r}: {type(e).__name__}: "
                           f"{getattr(e, 'msg', None) if isinstance(e, SyntaxError) else e}{where}")


def _import_module(module: str):
    if module.endswith(".py"):
        path = Path(module)
        if not path.is_file():
            raise StabilizerError(f"stabilizer module file not found: {module}")
        name = f"stabench_user_{path.stem}"
        try:
            spec = importlib.util.spec_from_file_location(name, path)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod
            spec.loader.exec_module(mod)
        except Exception as e:
            sys.modules.pop(name, None)
            raise _import_error(module, e) from e
        return mod
    try:
        return importlib.import_module(module)
    except Exception as e:
        raise _import_error(module, e) from e


def load_stabilizer_class(spec: str) -> type[Stabilizer]:
    """Resolve a stabilizer spec (see module doc) to its class."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    if ":" in spec:
        module, _, attr = spec.rpartition(":")
        cls = getattr(_import_module(module), attr, None)
        if cls is None:
            raise StabilizerError(f"module {module!r} has no attribute {attr!r}")
    else:
        eps = _entry_points()
        if spec not in eps:
            allowed = sorted(BUILTIN) + sorted(eps)
            raise StabilizerError(
                f"unknown stabilizer {spec!r}; allowed: {', '.join(allowed)}, "
                "or 'module:Class' for a third-party stabilizer")
        try:
            cls = eps[spec].load()
        except Exception as e:
            raise _import_error(eps[spec].value, e) from e
    if not (isinstance(cls, type) and issubclass(cls, Stabilizer)):
        raise StabilizerError(f"{spec!r} is not a subclass of bench.stabilizers.Stabilizer")
    return cls


def make_stabilizer(spec: str, **hparams: Any) -> Stabilizer:
    """Instantiate a stabilizer; hyperparameters it does not have are an error.

    ``None`` values are dropped, so callers can pass ``lam=None`` for "default". Every
    hyperparameter of the instance must be a finite number (they are recorded as floats and
    swept as numbers); an exception in the class's constructor is reported naming it.
    """
    import math

    cls = load_stabilizer_class(spec)
    hparams = {k: v for k, v in hparams.items() if v is not None}
    allowed = cls.hyperparameter_names()
    unknown = sorted(set(hparams) - set(allowed))
    if unknown:
        raise StabilizerError(
            f"stabilizer {spec!r} has no hyperparameter {', '.join(unknown)}; "
            f"allowed: {', '.join(allowed) or '(none)'}")
    try:
        stab = cls(**hparams)
    except (TypeError, ValueError) as e:
        raise StabilizerError(str(e)) from e
    except Exception as e:
        raise StabilizerError(f"stabilizer {spec!r}: {cls.__name__}(...) raised {type(e).__name__}: {e}") from e
    for name, value in stab.hyperparameters().items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise StabilizerError(
                f"stabilizer {spec!r}: hyperparameter {name} = {value!r} ({type(value).__name__}) is not allowed; "
                "hyperparameters must be finite numbers (declare them as float fields)")
    return stab
