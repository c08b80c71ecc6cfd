"""Fixtures for model-level tests (megatron-core parallel state on one process: tests/conftest.py)."""

import pytest
import torch

from megatron_ct.parallel.launch import free_port


@pytest.fixture
def seeded():
    """Deterministic CPU RNG per test."""
    torch.manual_seed(1234)


@pytest.fixture
def tcp_port() -> int:
    """A free localhost port for a multi-process gloo rendezvous."""
    return free_port()
