import sys
from pathlib import Path

import pytest

# Tests import helpers (tests/launch.py) and the package from the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


# The longest file (the quickstart, ~3 minutes) first: with `-n 2 --dist loadfile` one worker
# takes it while the other runs the rest, instead of it starting last on an idle suite.
FIRST = ("tests/test_quickstart.py",)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: not item.nodeid.startswith(FIRST))


@pytest.fixture(scope="session")
def mcore_tp1():
    """megatron-core parallel_state with TP=PP=CP=1 on a world-size-1 gloo group (this process)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_ct.parallel.launch import tcp_init_method

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", init_method=tcp_init_method(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    yield parallel_state
    parallel_state.destroy_model_parallel()
    if created:
        dist.destroy_process_group()
