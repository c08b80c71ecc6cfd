"""How every command line of megatron-ct ends when its input or environment is at fault.

An expected failure (a :class:`~megatron_ct.errors.CTError`, plus whatever a tool declares as
input errors, such as a missing file) ends in one line on stderr,
``<tool>: error: <what> (<file or key>): <expected>``, and exit status 2. The traceback is
shown only with ``--debug`` or ``MEGATRON_CT_DEBUG=1``; anything unexpected keeps its
traceback (it is a bug to report).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable

from megatron_ct.errors import CTError

EXIT_INPUT = 2

# Warnings megatron-core and torch emit on import or on every rank for conditions our own logs
# already report (which norm/optimizer implementation runs), or that are internal to
# megatron-core's checkpoint code. Anything else still shows.
KNOWN_NOISE = (
    "Transformer Engine and Apex are not installed",
    "Apex is not installed",
    "full scope is deprecated",
    "Please use DTensor instead",
    "`load_state_dict` is deprecated",
    "`torch.distributed.all_gather_into_tensor` is deprecated",
)


def quiet_known_warnings() -> None:
    for message in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=".*" + message)


quiet_known_warnings()  # entry points import this module before megatron-core


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an input or environment error (MEGATRON_CT_DEBUG=1)"
    )


def debug_requested(args: argparse.Namespace | None = None) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("MEGATRON_CT_DEBUG") == "1"


def one_line(error: BaseException) -> str:
    """The message of an expected failure as one line (an OSError names its file)."""
    if isinstance(error, OSError) and error.strerror:
        where = f" ({error.filename})" if error.filename else ""
        return f"{error.strerror}{where}"
    text = " ".join(str(error).split()) or type(error).__name__
    return text


def run_tool(
    name: str,
    body: Callable[[], int | None],
    args: argparse.Namespace | None = None,
    expected: tuple[type[BaseException], ...] = (),
) -> int:
    """Run a tool's work; expected failures become ``name: error: ...`` and exit status 2."""
    try:
        return body() or 0
    except (CTError, *expected) as e:
        if debug_requested(args):
            raise
        print(f"{name}: error: {one_line(e)}", file=sys.stderr)
        return EXIT_INPUT
