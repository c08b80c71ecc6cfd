"""The one way we draw PNGs: a display-free matplotlib, and figures written atomically."""

from __future__ import annotations

import os
from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (files only, no display); imported when a plot
    is drawn, so nothing else needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: str | os.PathLike, dpi: int = 120) -> str:
    """Write ``fig`` to ``path`` and close it; never a half-written PNG under the final name."""
    import matplotlib.pyplot as plt

    path = os.fspath(path)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)
    return path
