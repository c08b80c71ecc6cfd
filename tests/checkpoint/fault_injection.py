"""Entry point for tests: pretrain_ct.py with a fault injected, chosen by CT_FAULT.

CT_FAULT=kill_during_save:N  every rank dies (os._exit) in the middle of writing the
                             checkpoint of iteration N, after its shards are on disk
CT_FAULT=sigterm_after:N     rank 0 receives SIGTERM right after iteration N
CT_FAULT=kill_after:N        every rank dies (os._exit) right after logging iteration N
CT_FAULT=killpg_after:N      rank 0 sends SIGTERM to its whole process group (every rank, their
                             checkpoint helpers; what SLURM does) right after iteration N
CT_FAULT=killpg_during_save:N  the same, sent by rank 0's checkpoint writer process while it
                             writes the checkpoint of iteration N
CT_FAULT=sigstop_after_save:N  the last rank stops itself (SIGSTOP: a frozen host) once the
                             checkpoint of iteration N is saved; the others go on into a hang
                             (CT_FAULT_WAKE_S=S: it continues after S s, so the launcher can
                             end it at once instead of waiting out its SIGTERM grace)
CT_FAULT=hang_in_save:N      every rank hangs (sleeps) inside the save of iteration N, as on a
                             hung file system
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: launch.py

from launch import process_group, signal_arrived, wait_for  # noqa: E402


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))


def _signal_whole_group() -> None:
    """SIGTERM to this process group, as SLURM sends it to a job's processes; returns once it has
    arrived everywhere (every handler has it, every helper holds it blocked), so that what follows
    (this step's preemption check, the rest of a shard write) happens after it, as in a real job."""
    group = os.getpgrp()
    os.killpg(group, signal.SIGTERM)
    wait_for(
        lambda: all(signal_arrived(pid, signal.SIGTERM) for pid in process_group(group)),
        30,
        f"SIGTERM to reach every process of process group {group}",
    )


def install(fault: str) -> None:
    kind, n = fault.split(":")
    n = int(n)
    if kind == "kill_during_save":
        from megatron.core import dist_checkpointing

        real_save = dist_checkpointing.save

        def dying_save(state, path, *a, **k):
            real_save(state, path, *a, **k)
            if f"iter_{n:07d}" in str(path):
                os._exit(9)  # as if SLURM killed the job: no cleanup, no rename

        dist_checkpointing.save = dying_save
    elif kind == "sigterm_after":
        from megatron_ct.training import trainer

        real_log = trainer.Trainer._log

        def log_then_signal(self, *a, **k):
            real_log(self, *a, **k)
            if self.iteration == n and int(os.environ.get("RANK", 0)) == 0:
                os.kill(os.getpid(), signal.SIGTERM)

        trainer.Trainer._log = log_then_signal
    elif kind == "kill_after":
        from megatron_ct.training import trainer

        real_log = trainer.Trainer._log

        def log_then_die(self, *a, **k):
            real_log(self, *a, **k)
            if self.iteration == n:
                os._exit(9)  # kill -9: logs written so far stay, nothing is saved

        trainer.Trainer._log = log_then_die
    elif kind == "killpg_after":
        from megatron_ct.training import trainer

        real_log = trainer.Trainer._log

        def log_then_signal_group(self, *a, **k):
            real_log(self, *a, **k)
            if self.iteration == n and _rank() == 0:
                _signal_whole_group()  # the handlers run before this step's preemption check

        trainer.Trainer._log = log_then_signal_group
    elif kind == "killpg_during_save":
        from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

        real_write = FileSystemWriterAsync.write_preloaded_data

        def signal_group_then_write(transform_list, local_proc_idx, write_bucket, *a, **k):
            # Runs in the writer process megatron-core forks for each shard file.
            if f"iter_{n:07d}" in str(write_bucket[0]) and _rank() == 0 and local_proc_idx == 0:
                _signal_whole_group()  # every process has it before the write goes on
            return real_write(transform_list, local_proc_idx, write_bucket, *a, **k)

        FileSystemWriterAsync.write_preloaded_data = staticmethod(signal_group_then_write)
    elif kind == "sigstop_after_save":
        from megatron_ct.training import trainer

        real_save = trainer.Trainer._timed_save

        def save_then_stop(self, *a, **k):
            real_save(self, *a, **k)
            if self.iteration == n and _rank() == int(os.environ.get("WORLD_SIZE", 1)) - 1:
                wake = os.environ.get("CT_FAULT_WAKE_S")  # a test's time: SIGCONT after this long
                if wake:
                    import subprocess

                    subprocess.Popen(["sh", "-c", f"sleep {float(wake)}; kill -CONT {os.getpid()}"])
                os.kill(os.getpid(), signal.SIGSTOP)

        trainer.Trainer._timed_save = save_then_stop
    elif kind == "hang_in_save":
        import time

        from megatron_ct.training import trainer

        real_save = trainer.Trainer.save

        def hanging_save(self, *a, **k):
            if self.iteration == n:
                time.sleep(600)
            return real_save(self, *a, **k)

        trainer.Trainer.save = hanging_save
    else:
        raise ValueError(f"CT_FAULT: unknown fault {fault!r}")


if __name__ == "__main__":
    install(os.environ["CT_FAULT"])
    import pretrain_ct

    sys.exit(pretrain_ct.main())
