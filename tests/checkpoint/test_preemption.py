"""helpers_ignore_sigterm: helper processes started inside survive SIGTERM, the caller still gets it."""

import multiprocessing as mp
import os
import signal
import time

from megatron_ct.checkpoint.preemption import helpers_ignore_sigterm


def _manager_survives_sigterm() -> bool:
    """A spawned manager (what megatron-core's writer keeps) started inside the block, then
    SIGTERM to it: does its queue still work?"""
    with helpers_ignore_sigterm():
        manager = mp.get_context("spawn").Manager()
        queue = manager.Queue()
    try:
        os.kill(manager._process.pid, signal.SIGTERM)
        time.sleep(0.5)
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
        # A signal that arrives inside the block reaches this process when it ends.
        with helpers_ignore_sigterm():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
        time.sleep(0.1)
        assert received
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
