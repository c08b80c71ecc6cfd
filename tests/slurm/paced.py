"""Interpreter wrapper for the SLURM tests (PYTHON="python3 tests/slurm/paced.py"): runs
pretrain_ct.py with every training step slowed down by CT_STEP_DELAY seconds on a job's first
run (SLURM_RESTART_COUNT unset or 0), so that a signal SLURM sends at a time it chooses (the
time-limit warning) lands mid-run. A requeued run trains at full speed."""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

if __name__ == "__main__":
    if os.environ.get("SLURM_RESTART_COUNT", "0") == "0":
        from megatron_ct.training import trainer

        real_step, delay = trainer.train_step, float(os.environ.get("CT_STEP_DELAY", "1"))

        def paced_step(*a, **k):
            time.sleep(delay)  # the pacing is the point, not a wait: SLURM's warning must land mid-run
            return real_step(*a, **k)

        trainer.train_step = paced_step
    import pretrain_ct

    if not sys.argv[1].endswith("pretrain_ct.py"):
        raise SystemExit(f"paced.py: expected pretrain_ct.py as the script, got {sys.argv[1]}")
    sys.exit(pretrain_ct.main(sys.argv[2:]))
