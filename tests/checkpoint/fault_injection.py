"""Entry point for tests: pretrain_ct.py with a fault injected, chosen by CT_FAULT.

CT_FAULT=kill_during_save:N  every rank dies (os._exit) in the middle of writing the
                             checkpoint of iteration N, after its shards are on disk
CT_FAULT=sigterm_after:N     rank 0 receives SIGTERM right after iteration N
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


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
    else:
        raise ValueError(f"CT_FAULT: unknown fault {fault!r}")


if __name__ == "__main__":
    install(os.environ["CT_FAULT"])
    import pretrain_ct

    sys.exit(pretrain_ct.main())
