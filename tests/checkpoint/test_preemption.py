"""helpers_ignore_sigterm: helper processes started inside survive SIGTERM, the caller still gets it."""

import multiprocessing as mp
import os
import signal

from megatron_ct.checkpoint.preemption import helpers_ignore_sigterm

from launch import signal_arrived, wait_for


def _manager_survives_sigterm() -> bool:
    """A spawned manager (what megatron-core's writer keeps) started inside the block, then
    SIGTERM to it: does its queue still work once the signal has arrived?"""
    with helpers_ignore_sigterm():
        manager = mp.get_context("spawn").Manager()
        queue = manager.Queue()
    try:
        pid = manager._process.pid
        os.kill(pid, signal.SIGTERM)
        # Arrived: the manager died of it, or holds it blocked (pending for good).
        wait_for(lambda: signal_arrived(pid, signal.SIGTERM), 10, f"SIGTERM to reach the manager (pid {pid})")
        try:
            queue.put(1)
            return queue.get(timeout=5) == 1
        except (OSError, EOFError):
            return False
    finally:
        manager._process.kill()


def test_helpers_survive_sigterm_and_the_trainer_still_sees_it():
    received = []
    previous = signal.signal(signal.SIGTERM, lambda *_: received.append(True))
    try:
        assert _manager_survives_sigterm()
        # A signal sent inside the block (to itself: pending, or taken by another thread, when
        # os.kill returns) reaches this process's handler; the block holds it back, no more.
        with helpers_ignore_sigterm():
            os.kill(os.getpid(), signal.SIGTERM)
        wait_for(lambda: received, 5, "the SIGTERM sent inside the block to reach the handler")
        assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, set())
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_without_a_sigterm_handler_helpers_end_with_the_process():
    # Nobody here would finish a save on SIGTERM, so the helpers are not shielded either.
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        assert not _manager_survives_sigterm()
    finally:
        signal.signal(signal.SIGTERM, previous)
