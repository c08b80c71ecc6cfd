"""Per-tensor progress bar and the process's peak memory, for both conversion directions."""

from __future__ import annotations

import resource
import sys


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far.

    Linux: ``VmHWM`` of /proc/self/status, the high-water mark of this program's own memory.
    ``getrusage``'s ``ru_maxrss`` is not used there: it carries over the parent's RSS at fork
    through exec, so a child of a large process would report the parent's size.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS: bytes, others: KiB


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"  # unreachable; keeps type checkers quiet


class Progress:
    """tqdm bar counting tensors, with the bytes written so far as a postfix."""

    def __init__(self, total_items: int, total_bytes: int, desc: str, enabled: bool = True) -> None:
        from tqdm import tqdm

        self.total_bytes = total_bytes
        self.done_bytes = 0
        self.bar = tqdm(
            total=total_items,
            desc=desc,
            unit="tensor",
            disable=not enabled,
            file=sys.stderr,
            dynamic_ncols=True,
            mininterval=0.5,  # a redirected log gets a line per refresh
        )

    def update(self, nbytes: int) -> None:
        self.done_bytes += nbytes
        self.bar.set_postfix_str(f"{format_bytes(self.done_bytes)}/{format_bytes(self.total_bytes)}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
