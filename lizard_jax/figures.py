"""Matplotlib without a display (the Agg backend: servers, CI) and the one way figures are written."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """`matplotlib.pyplot` on the Agg backend (imported on first use: plotting is optional)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path, *, title: str | None = None, title_size: float | None = None, dpi: int = 120) -> Path:
    """Title `fig`, lay it out, write it to `path` (parent folders made) and close it (pyplot keeps every open
    figure alive otherwise); returns the path."""
    if title:
        fig.suptitle(title, fontsize=title_size)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path
