"""Training script for the SLURM tests (TRAIN_SCRIPT=tests/slurm/paced.py): pretrain_ct.py, with
every training step past iteration CT_PACE_FROM (default 0) slowed down by CT_STEP_DELAY seconds
on one run of the job (CT_PACED_RUN, by SLURM_RESTART_COUNT; default the first), so that a
signal SLURM sends at a time it chooses (the time-limit warning) or a test's kill lands mid-run,
and with a fault of tests/checkpoint/fault_injection.py (CT_FAULT) on the first run. Other runs
train as usual."""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "checkpoint"))  # fault_injection.py

if __name__ == "__main__":
    run = os.environ.get("SLURM_RESTART_COUNT", "0")
    if "CT_STEP_DELAY" in os.environ and run == os.environ.get("CT_PACED_RUN", "0"):
        from megatron_ct.training import trainer

        real_step, delay = trainer.train_step, float(os.environ["CT_STEP_DELAY"])
        pace_from = int(os.environ.get("CT_PACE_FROM", "0"))

        def paced_step(iteration, *a, **k):  # iteration: the steps done before this one
            if iteration >= pace_from:  # the pacing is the point, not a wait: SLURM's warning must land mid-run
                time.sleep(delay)
            return real_step(iteration, *a, **k)

        trainer.train_step = paced_step
    if os.environ.get("CT_FAULT") and run == "0":
        import fault_injection

        fault_injection.install(os.environ["CT_FAULT"])
    import pretrain_ct

    sys.exit(pretrain_ct.main(sys.argv[1:]))
