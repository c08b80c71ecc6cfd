"""Process-group set-up: torchrun or SLURM environment, backend, megatron-core parallel state."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_ct.config import CTConfig, Layout
from megatron_ct.errors import ConfigError
from megatron_ct.parallel.device import activate_cpu_device_layer
from megatron_ct.parallel.launch import free_port

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # 'torchrun', 'slurm' or 'single'


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """'gpu[01-03,07],login1' -> ['gpu01', 'gpu02', 'gpu03', 'gpu07', 'login1'] (what
    ``scontrol show hostnames`` prints), without needing scontrol on the compute node."""
    hosts: list[str] = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            if "-" in part:
                lo, hi = part.split("-")
                hosts.extend(f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1))
            else:
                hosts.append(prefix + part)
    return hosts


def read_launch_env(environ: dict[str, str] | None = None) -> LaunchEnv:
    """Rank and rendezvous from torchrun's variables, else from SLURM's (``srun`` without
    torchrun: one task per GPU), else a single process."""
    env = dict(os.environ if environ is None else environ)
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        # A port derived from the job id keeps two jobs sharing a node from colliding.
        port = int(env.get("MASTER_PORT", 20000 + int(env.get("SLURM_JOB_ID", "0")) % 10000))
        return LaunchEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR") or expand_slurm_nodelist(nodelist)[0],
            master_port=port,
            launcher="slurm",
        )
    # One process rendezvouses with itself: any free port (two runs on one machine must not meet).
    port = int(env["MASTER_PORT"]) if "MASTER_PORT" in env else free_port()
    return LaunchEnv(0, 1, 0, "127.0.0.1", port, "single")


def init_distributed(cfg: CTConfig, layout: Layout, env: LaunchEnv) -> None:
    """Create the process group and megatron-core's parallel state on ``layout.device``.

    On CPU this installs the CPU device layer first, so megatron-core's CUDA calls
    resolve to the CPU from the first one on.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if layout.on_gpu:
        torch.cuda.set_device(layout.device)
        backend = "nccl"
    else:
        activate_cpu_device_layer()
        backend = "gloo"
    if not dist.is_initialized():
        try:
            dist.init_process_group(
                backend=backend,
                init_method=f"tcp://{env.master_addr}:{env.master_port}",
                rank=env.rank,
                world_size=env.world_size,
                timeout=timedelta(minutes=startup_timeout_minutes(cfg)),
            )
        except RuntimeError as e:  # torch's DistNetworkError is one
            if "EADDRINUSE" not in str(e) and "address already in use" not in str(e).lower():
                raise
            raise ConfigError(
                f"MASTER_PORT {env.master_port}: address already in use on {env.master_addr}; expected a free port "
                "(set MASTER_PORT, or let torchrun choose one)"
            ) from None
    # megatron-core adds gloo copies of its data-parallel groups for host-side transfers (the
    # distributed optimizer's mem-efficient state gather). On CPU every group is gloo already,
    # and each gloo group runs a network thread that wakes every 10 ms: on a small machine those
    # wake-ups preempt the compute threads. So on CPU the copies are not created.
    parallel_state.initialize_model_parallel(
        **layout.dims.megatron_core_sizes(),
        create_gloo_process_groups=layout.on_gpu,
        distributed_timeout_minutes=startup_timeout_minutes(cfg),  # else megatron-core's groups wait 30 min
    )
    # Seeds the default generator (CPU initialisation, data-parallel-shared randomness) and
    # megatron-core's tensor-parallel RNG tracker (per-TP-rank dropout).
    torch.manual_seed(cfg.train.seed)
    model_parallel_cuda_manual_seed(cfg.train.seed)


def startup_timeout_minutes(cfg) -> int:
    """The collective timeout until the first training step (``parallel.distributed_init_timeout_minutes``,
    else the training one)."""
    p = cfg.parallel
    return p.distributed_init_timeout_minutes or p.distributed_timeout_minutes


def set_collective_timeout(minutes: float) -> int:
    """Every process group of this rank (the default one, megatron-core's, the CPU device
    layer's shared ones) gets ``minutes`` as its collective timeout; returns how many groups.
    Collective in effect only (each rank sets its own groups). Through torch's
    ``distributed_c10d._set_pg_timeout`` (private; torchtitan switches its init and training
    timeouts the same way): gloo and NCCL groups."""
    from torch.distributed import distributed_c10d as c10d

    if not dist.is_initialized():
        return 0
    timeout = timedelta(minutes=minutes)
    groups = list(c10d._world.pg_map)
    for group in groups:
        c10d._set_pg_timeout(timeout, group)
    return len(groups)


def teardown_distributed() -> None:
    """Destroy every process group and let go of every reference to one, so that the groups'
    worker threads are joined here, not at interpreter exit (see
    :func:`~megatron_ct.parallel.device.release_shared_process_groups`)."""
    from megatron.core import parallel_state

    from megatron_ct.compat import forget_leftover_groups
    from megatron_ct.parallel.device import release_shared_process_groups

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    forget_leftover_groups()
    release_shared_process_groups()
    if dist.is_initialized():
        dist.destroy_process_group()
