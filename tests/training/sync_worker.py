"""Worker for test_host_syncs.py: train in this process and count host syncs per iteration.

    python tests/training/sync_worker.py OUT.json key=value ...

Runs pretrain_ct.py's training as a single rank (gloo, CPU device layer) with every
training iteration (step plus bookkeeping) inside a HostSyncCounter; writes
``[{"iteration": k, "syncs": [...], "fused_adam": bool}]``.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(out: str, overrides: list[str]) -> None:
    from megatron_ct.config import load_config
    from megatron_ct.parallel.device import HostSyncCounter
    from megatron_ct.training import trainer

    records = []
    real = trainer.Trainer._iteration

    def counted(self, preempt):
        with HostSyncCounter() as counter:
            stop = real(self, preempt)
        groups = [
            g for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]) for g in opt.param_groups
        ]
        records.append(
            {"iteration": self.iteration, "syncs": counter.events, "fused_adam": all(g["fused"] for g in groups)}
        )
        return stop

    trainer.Trainer._iteration = counted
    trainer.run_training(load_config(None, overrides))
    Path(out).write_text(json.dumps(records))


if __name__ == "__main__":
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    main(sys.argv[1], sys.argv[2:])
