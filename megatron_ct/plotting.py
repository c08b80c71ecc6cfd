"""The one way we draw PNGs: a display-free matplotlib, and figures written atomically."""

from __future__ import annotations

import os
from typing import Any

from megatron_ct.atomic import atomic_write


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
    try:
        with atomic_write(path, "wb") as f:
            fig.savefig(f, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return path
