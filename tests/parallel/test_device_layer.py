"""The CPU device layer maps megatron-core's CUDA placements to CPU, and can be removed."""

import subprocess
import sys
import textwrap


def run(code: str) -> str:
    # A fresh interpreter: the layer is process-wide.
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def test_cuda_placements_land_on_cpu_and_layer_is_removable():
    out = run("""
        import warnings; warnings.filterwarnings("ignore")
        import torch
        from megatron_ct.parallel.device import activate_cpu_device_layer, deactivate_cpu_device_layer
        activate_cpu_device_layer()
        a = torch.zeros(2, device="cuda")
        b = torch.ones(2, device=torch.cuda.current_device())
        c = torch.ones(2).cuda()
        torch.cuda.synchronize()
        print(a.device, b.device, c.device, a.type(), torch.ones(1, dtype=torch.bfloat16).type())
        deactivate_cpu_device_layer()
        try:
            torch.zeros(1, device="cuda")
            print("still mapped")
        except (RuntimeError, AssertionError):
            print("restored")
    """)
    assert out.splitlines() == ["cpu cpu cpu torch.cuda.FloatTensor torch.cuda.BFloat16Tensor", "restored"]


def test_megatron_rng_tracker_forks_cpu_generator():
    out = run("""
        import warnings; warnings.filterwarnings("ignore")
        import torch
        from megatron_ct.parallel.device import activate_cpu_device_layer
        activate_cpu_device_layer()
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
        tracker = get_cuda_rng_tracker()
        tracker.add("model-parallel-rng", 123)
        torch.manual_seed(7); before = torch.rand(1).item()
        torch.manual_seed(7)
        with tracker.fork():
            inside = torch.rand(1).item()
        after = torch.rand(1).item()
        print(before == after, inside != before)
    """)
    assert out == "True True"


def test_rewrites_suspended_only_inside_the_block_and_not_under_another_mode():
    """The model forward runs without the rewriting mode; it is back afterwards (also after an
    exception), and a mode stacked on top of ours (a test's HostSyncCounter) keeps it active."""
    out = run("""
        import warnings; warnings.filterwarnings("ignore")
        import torch
        from megatron_ct.parallel.device import (
            HostSyncCounter, activate_cpu_device_layer, rewrites_suspended)
        activate_cpu_device_layer()

        def mapped():
            try:
                return torch.zeros(1, device="cuda").device.type
            except (RuntimeError, AssertionError):
                return "unmapped"

        with rewrites_suspended():
            inside = mapped()
            cpu_still = torch.ones(1, device=torch.cuda.current_device()).device.type
        try:
            with rewrites_suspended():
                raise ValueError
        except ValueError:
            pass
        after = mapped()
        with HostSyncCounter():
            with rewrites_suspended():
                stacked = mapped()
        print(inside, cpu_still, after, stacked)
    """)
    assert out == "unmapped cpu cpu cpu"
