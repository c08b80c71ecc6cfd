"""torchrun as one SLURM task per node: ``srun --ntasks-per-node 1 python -m megatron_ct.parallel.slurm_torchrun
--nnodes N --nproc-per-node P --rdzv-backend c10d --rdzv-endpoint HOST:PORT --rdzv-id ID script args``.

Takes torchrun's own arguments and runs torchrun's launcher with four changes that make a
SLURM step behave as if srun had started every rank itself (examples/slurm/pretrain_ct.sbatch):

- The trainers stay in this task's process group. torchrun starts each one in a new session,
  out of reach of a SLURM that tracks a step by process group (``proctrack/pgid``): SLURM's
  SIGTERM (preemption, ``scancel``, requeue) would reach the agent only, and its SIGKILL
  (``--kill-on-bad-exit``, ``KillWait``) would leave the trainers and their checkpoint helpers
  running, holding the step open. In the task's group SLURM signals and kills them directly.
- SIGTERM is not the agent's to handle: the trainers get it from SLURM and save at their own
  pace within ``KillWait``; torchrun's handler would kill them after its shutdown timeout
  (30 s) and end in a traceback and exit 1. The agent waits for them and exits 0 when they
  have saved and stopped. A SIGTERM before any trainer started (in the rendezvous, waiting for
  a node) stops the agent at once with 143, as torchrun would, instead of after ``KillWait``.
- After a failure the other trainers get time to end on their own (a hang: with their stacks)
  before the agent kills them, instead of torchrun's SIGTERM at once.
- A failure ends in one line per failed rank and the exit status of the first one (128 + N for
  a signal N), not torchrun's exit 1, so that srun reports the trainers' own status (2 a config
  or input error, 3 ``train.nan_policy=stop``, 4 a hang). srun's own status is the largest over
  its tasks, 143 for those it terminated after the first failure: the trainers also leave their
  status in ``MEGATRON_CT_STATUS_DIR`` (:func:`megatron_ct.cli.record_exit_status`).

``is_host`` of the c10d rendezvous is set from ``SLURM_NODEID``: node 0's agent serves the
rendezvous store at the endpoint, every other one connects to it (torchrun's guess compares
host names and addresses, which fails where nodes share an address, or name themselves otherwise).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys

from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing import api as mp_api
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.elastic.multiprocessing.subprocess_handler import SubprocessHandler

SHUTDOWN_TIMEOUT_S = 5
"""Seconds the agent leaves the trainers still running once one of them has failed before it
kills them (SIGKILL). Without a SIGTERM first: it would not stop a trainer waiting in a
collective sooner, and would kill one whose watchdog is about to write its stack (the ranks of
a hang reach their timeout within a fraction of a second of each other)."""


class _InTaskProcessGroup(SubprocessHandler):
    """torchrun's handler of one trainer process, started in the agent's process group."""

    def _popen(self, args: tuple, env: dict[str, str]) -> subprocess.Popen:
        return subprocess.Popen(args=args, env=env, stdout=self._stdout, stderr=self._stderr)

    def close(self, death_sig: signal.Signals | None = None) -> None:
        # To the trainer only: its group is the whole step's. torchrun's SIGTERM after a failure
        # is not sent (SHUTDOWN_TIMEOUT_S); SIGKILL and a signal the agent stopped on are.
        try:
            if death_sig not in (None, signal.SIGTERM):
                self.proc.send_signal(death_sig)
        except ProcessLookupError:
            pass
        for stream in (self._stdout, self._stderr):
            if stream:
                stream.close()


_trainers_started = False


def _in_task_process_group(**kwargs) -> SubprocessHandler:
    global _trainers_started
    _trainers_started = True
    return _InTaskProcessGroup(**kwargs)


def _on_sigterm(signum: int, frame) -> None:
    """Before any trainer started (the rendezvous): nothing to save, so stop now as torchrun
    does on a signal, rather than wait in the rendezvous for SLURM's SIGKILL after KillWait.
    Afterwards the trainers have it too: wait for them."""
    if not _trainers_started:
        raise SignalException(f"Process {os.getpid()} got signal: {signum}", sigval=signal.Signals(signum))


def _not_the_sigterm_we_skip(record: logging.LogRecord) -> bool:
    """torchrun logs "Sending process P closing signal SIGTERM" before calling close()."""
    return not (record.getMessage().startswith("Sending process") and record.getMessage().endswith("SIGTERM"))


def _status(exitcode: int) -> int:
    return exitcode if exitcode >= 0 else 128 - exitcode


def _describe(exitcode: int) -> str:
    if exitcode >= 0:
        return f"exited {exitcode}"
    return f"killed by {signal.Signals(-exitcode).name}"


def main(argv: list[str] | None = None) -> int:
    if not hasattr(mp_api, "get_subprocess_handler"):
        raise SystemExit(
            "slurm_torchrun: this torch has no torch.distributed.elastic.multiprocessing.api.get_subprocess_handler; "
            "expected torch >= 2.3 (or run the sbatch script with LAUNCHER=srun)"
        )
    args = torchrun.parse_args(argv)
    node = os.environ.get("SLURM_NODEID")
    if node is not None and "is_host" not in (args.rdzv_conf or ""):
        args.rdzv_conf = ",".join(filter(None, [args.rdzv_conf, f"is_host={int(node == '0')}"]))
    handled = [s for s in args.signals_to_handle.split(",") if s.strip() != "SIGTERM"]
    args.signals_to_handle = ",".join(handled)
    if args.shutdown_timeout is None:
        args.shutdown_timeout = SHUTDOWN_TIMEOUT_S
    mp_api.get_subprocess_handler = _in_task_process_group
    logging.getLogger(mp_api.__name__).addFilter(_not_the_sigterm_we_skip)
    signal.signal(signal.SIGTERM, _on_sigterm)
    where = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    try:
        torchrun.run(args)
    except ChildFailedError as e:
        for rank, failure in sorted(e.failures.items()):
            print(f"torchrun on {where}: rank {rank} {_describe(failure.exitcode)}", file=sys.stderr)
        return _status(e.get_first_failure()[1].exitcode)
    except SignalException as e:  # SIGINT, SIGHUP, SIGQUIT (torchrun stopped the trainers); SIGTERM before any
        print(f"torchrun on {where}: stopped by {e.sigval.name}", file=sys.stderr)
        return 128 + e.sigval.value
    return 0


if __name__ == "__main__":
    sys.exit(main())
