"""One fixed colour per stabilizer, the same in every figure and report.

Built-ins have fixed colours. Any other stabilizer (a third-party submission) gets one of
the further colours chosen by a hash of its name, so its colour does not depend on the
order rows happen to arrive in; when two present names would share a colour, the later
name (alphabetically) moves to the next free one.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np
from matplotlib.colors import to_rgb

BUILTIN_ORDER = ("baseline", "zloss", "muloss", "mucentering", "softcap")
BUILTIN_COLORS: dict[str, str] = {
    "baseline": "#555555",     # grey: the reference
    "zloss": "#1f77b4",        # blue
    "muloss": "#2ca02c",       # green
    "mucentering": "#d62728",  # red
    "softcap": "#ff7f0e",      # orange
}
EXTRA_COLORS = ("#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f3c8d",
                "#11a579", "#3969ac", "#f2b701", "#e73f74", "#80ba5a", "#008695")


def _slot(name: str) -> int:
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % len(EXTRA_COLORS)


def stabilizer_colors(names: Iterable[str]) -> dict[str, str]:
    """Colour (hex) of each stabilizer in ``names``; deterministic for a given set of names."""
    out = {n: BUILTIN_COLORS[n] for n in names if n in BUILTIN_COLORS}
    used: set[int] = set()
    for name in sorted({n for n in names if n not in BUILTIN_COLORS}):
        slot = _slot(name)
        for k in range(len(EXTRA_COLORS)):
            candidate = (slot + k) % len(EXTRA_COLORS)
            if candidate not in used or len(used) >= len(EXTRA_COLORS):
                break
        used.add(candidate)
        out[name] = EXTRA_COLORS[candidate]
    return out


def shades(color: str, n: int) -> list[tuple[float, float, float]]:
    """``n`` shades of ``color`` from light to dark (for a line per hyperparameter value)."""
    rgb = np.array(to_rgb(color))
    if n == 1:
        return [tuple(rgb)]
    out = []
    for t in np.linspace(0.0, 1.0, n):
        if t < 0.5:   # light: mix with white
            mix = 0.5 * (1 - 2 * t)
            c = rgb + (1 - rgb) * mix
        else:         # dark: mix with black
            c = rgb * (1 - 0.55 * (2 * t - 1))
        out.append(tuple(float(x) for x in np.clip(c, 0, 1)))
    return out


LINESTYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1)), (0, (1, 3)))
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
