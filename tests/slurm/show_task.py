"""Stand-in training script (TRAIN_SCRIPT=tests/slurm/show_task.py): each rank says where it runs."""

import os
import sys

if __name__ == "__main__":
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID"))  # torchrun's, else srun's
    local = os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID"))
    world = os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS"))
    # One write: the ranks share the job's log, and python -u writes a print's end on its own.
    sys.stdout.write(f"rank {rank} local {local} of {world} gpus {os.environ.get('CUDA_VISIBLE_DEVICES', 'none')}\n")
