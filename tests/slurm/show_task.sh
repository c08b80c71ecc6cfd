#!/bin/bash
# Stand-in for the interpreter (PYTHON=tests/slurm/show_task.sh): each task says where it runs.
echo "task $SLURM_PROCID local $SLURM_LOCALID of $SLURM_NTASKS gpus ${CUDA_VISIBLE_DEVICES-none}"
