"""Small helpers for the notebooks in ``analysis/`` (display without relying on a backend)."""
from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from .figures import SkipFigure, save_figure
from .tables import to_markdown


def show(fig: Figure | None, dpi: int = 100) -> None:
    """Display a figure as a PNG image in the notebook (works with any matplotlib backend)."""
    if fig is None:
        return
    from IPython.display import Image, display

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    display(Image(data=buf.getvalue(), format="png"))


def show_table(df: pd.DataFrame, title: str = "") -> None:
    """Display a table as Markdown (or a note when it is empty)."""
    from IPython.display import Markdown, display

    if df.empty:
        print(f"note: table {title!r} is empty for these runs")
        return
    display(Markdown((f"**{title}**\n\n" if title else "") + to_markdown(df)))


def figure(name: str, draw: Callable[..., Figure], *args, out: str | Path | None = None, **kwargs) -> Figure | None:
    """Draw a figure, save it as ``out/name.png`` and ``.pdf`` (when ``out``) and display it.

    A figure the data cannot show is skipped with a printed note (None is returned).
    """
    try:
        fig = draw(*args, **kwargs)
    except SkipFigure as e:
        print(f"note: figure {name} skipped: {e}")
        return None
    if out is None:
        show(fig)
        return fig
    from IPython.display import Image, display

    png = next(p for p in save_figure(fig, out, name) if p.suffix == ".png")
    display(Image(data=png.read_bytes(), format="png"))  # the saved file: no second rendering
    return fig
