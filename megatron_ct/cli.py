"""How every command line of megatron-ct reads its arguments and ends when its input is at fault.

Each tool and ``pretrain_ct.py`` build a :class:`ToolParser` and hand it, with their body, to
:func:`run_cli`. A usage mistake ends in one line ``<tool>: error: <message> (see --help)``;
an expected failure (a :class:`~megatron_ct.errors.CTError`, plus whatever a tool declares as
input errors) in one line ``<tool>: error: <file or key>: <what>; expected ...``; both with
exit status 2. The traceback is shown only with ``--debug`` or ``MEGATRON_CT_DEBUG=1``;
anything unexpected keeps its traceback (it is a bug to report).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import NoReturn

from megatron_ct.atomic import write_text_atomic
from megatron_ct.errors import ConfigError, CTError

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


class ToolParser(argparse.ArgumentParser):
    """The argument parser of a megatron-ct command line.

    ``prog`` is the tool's file name (a path is cut to it, so ``ToolParser(__file__, __doc__)``
    works); the description keeps its layout. Every parser and sub-parser takes ``--debug``. A
    usage mistake is one line ``<tool>: error: <message> (see --help)`` and exit status 2.
    """

    def __init__(self, prog: str, description: str | None = None, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(prog=os.path.basename(prog), description=description, **kwargs)
        # SUPPRESS: a sub-parser that did not see --debug leaves the main parser's value alone.
        self.add_argument(
            "--debug",
            action="store_true",
            default=argparse.SUPPRESS,
            help="show the traceback of an input or environment error (or MEGATRON_CT_DEBUG=1)",
        )

    def error(self, message: str) -> NoReturn:
        tool, _, command = self.prog.partition(" ")  # a sub-parser's prog is "<tool> <command>"
        where = f"{command}: " if command else ""
        self.exit(EXIT_INPUT, f"{tool}: error: {where}{' '.join(message.split())} (see --help)\n")


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``low`` (a usage error otherwise)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value

    return parse


def add_model_flags(parser: argparse.ArgumentParser, micro_batch_size: int, rows: str) -> None:
    """The flags every evaluation tool opens its model with (the fields of
    ``megatron_ct.evaluation.session.EvalOptions`` of the same names, plus ``--tokenizer``):
    ``micro_batch_size`` is the default number of ``rows`` (e.g. documents) per forward pass."""
    parser.add_argument("--tokenizer", metavar="DIR", help="tokenizer (default: the one stored with the checkpoint)")
    parser.add_argument(
        "--micro-batch-size",
        type=int_at_least(1),
        default=micro_batch_size,
        help=f"{rows} per forward pass ({micro_batch_size})",
    )
    for flag, name in (("tensor-model", "TP"), ("pipeline-model", "PP"), ("context", "CP")):
        parser.add_argument(
            f"--{flag}-parallel-size", type=int_at_least(1), default=1, help=f"{name} of this run (our checkpoints)"
        )
    parser.add_argument("--precision", default="auto", help="fp32, bf16, fp16 or auto (bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")


def float_above(low: float) -> Callable[[str], float]:
    """An argparse ``type``: a finite number > ``low`` (a usage error otherwise)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not low < value < math.inf:
            raise argparse.ArgumentTypeError(f"expected a number > {low:g}, got {text!r}")
        return value

    return parse


ExitCodes = Mapping[type[BaseException], int]


def run_cli(
    parser: argparse.ArgumentParser,
    body: Callable[..., int | None],
    argv: Sequence[str] | None = None,
    *,
    expected: tuple[type[BaseException], ...] = (),
    exit_codes: ExitCodes | Callable[[], ExitCodes] | None = None,
    extra_args: bool = False,
) -> int:
    """Parse ``argv`` (default: the command line), run ``body(args)`` and return the exit status.

    ``body`` returns the status (None: 0). With ``extra_args`` the words the parser does not
    know go to ``body(args, extras)`` (config overrides). A :class:`CTError` or an ``expected``
    exception ends in ``<tool>: error: <message>`` and status 2. ``exit_codes`` maps other
    exception types to a tool's own status, reported as ``<tool>: <message>``; a callable is
    called only when such an exception arrives, so the types can live in modules the tool
    imports late. ``--debug`` or ``MEGATRON_CT_DEBUG=1`` lets each of them through with its
    traceback.
    """
    tool = parser.prog.split(" ")[0]
    try:
        if extra_args:
            args, extras = parser.parse_known_args(argv)
            rest: tuple = (extras,)
        else:
            args, rest = parser.parse_args(argv), ()
    except SystemExit as e:  # --help, or a usage error already reported in one line
        return EXIT_INPUT if isinstance(e.code, str) else e.code or 0
    try:
        return body(args, *rest) or 0
    except (CTError, *expected) as e:
        if debug_requested(args):
            raise
        print(f"{tool}: error: {one_line(e)}", file=sys.stderr)
        return EXIT_INPUT
    except Exception as e:
        codes = exit_codes() if callable(exit_codes) else exit_codes or {}
        status = next((code for kind, code in codes.items() if isinstance(e, kind)), None)
        if status is None or debug_requested(args):
            raise
        print(f"{tool}: {one_line(e)}", file=sys.stderr)
        return status


STATUS_DIR_VARIABLE = "MEGATRON_CT_STATUS_DIR"


def record_exit_status(status: int) -> None:
    """Leave this process's exit ``status`` as ``rank<R>`` (R: RANK, else SLURM_PROCID) in the
    directory ``MEGATRON_CT_STATUS_DIR`` names, when it is set (the sbatch script sets it).

    What srun reports is not the trainers' status: the largest over its tasks, where the tasks
    SLURM killed after the first failure count as 128 + the signal. The script reads the status
    files to tell a config or input error (2), ``train.nan_policy=stop`` (3) and a hang (4) from
    a lost node. A failure to write is ignored: the exit status still tells the caller.
    """
    folder = os.environ.get(STATUS_DIR_VARIABLE)
    if not folder:
        return
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", f"pid{os.getpid()}"))
    try:
        os.makedirs(folder, exist_ok=True)
        # Atomic: a rank killed mid-write (SIGKILL after KillWait) leaves no file, never an
        # empty one the script would have to tell from a status.
        write_text_atomic(os.path.join(folder, f"rank{rank}"), f"{status}\n")
    except OSError:
        pass


def debug_requested(args: argparse.Namespace | None = None) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("MEGATRON_CT_DEBUG") == "1"


def one_line(error: BaseException) -> str:
    """The message of an expected failure as one line (an OSError names its file)."""
    if isinstance(error, OSError) and error.strerror:
        where = f" ({error.filename})" if error.filename else ""
        return f"{error.strerror}{where}"
    return " ".join(str(error).split()) or type(error).__name__


def check_output_dir(path: str, key: str) -> str:
    """``path`` as a directory a tool creates or writes into: not a file, under a directory.

    Checked before any work, so a typo does not cost a whole run. Raises ConfigError naming
    ``key``; creates nothing.
    """
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ConfigError(f"{key} {path}: is a file; expected a directory")
        return path
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"{key} {path}: {parent} is a file; expected a path under a directory")
    return path


def check_output_file(path: str, key: str) -> str:
    """``path`` as a file a tool writes: not a directory, and its directory exists.

    Raises ConfigError naming ``key``; creates nothing.
    """
    if os.path.isdir(path):
        raise ConfigError(f"{key} {path}: is a directory; expected a file name")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ConfigError(f"{key} {path}: no directory {parent}; expected a file in an existing directory")
    return path
