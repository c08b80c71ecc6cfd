"""Fixtures for model-level tests: megatron-core parallel state on one CPU process (gloo)."""

import pytest
import torch
import torch.distributed as dist

from megatron_ct.parallel.launch import free_port, tcp_init_method


@pytest.fixture(scope="session")
def mcore_tp1():
    """megatron-core parallel_state with TP=PP=CP=1 on a world-size-1 gloo group."""
    from megatron.core import parallel_state

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", init_method=tcp_init_method(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    yield parallel_state
    parallel_state.destroy_model_parallel()
    if created:
        dist.destroy_process_group()


@pytest.fixture
def seeded():
    """Deterministic CPU RNG per test."""
    torch.manual_seed(1234)


@pytest.fixture
def tcp_port() -> int:
    """A free localhost port for a multi-process gloo rendezvous."""
    return free_port()
