"""megatron-core version check (megatron_ct/compat.py)."""

import logging

from megatron_ct.compat import TESTED_VERSIONS, check_megatron_core_version, version_note


def test_tested_versions_pass_silently_and_others_are_named():
    assert "0.16.1" in TESTED_VERSIONS
    for v in TESTED_VERSIONS:
        assert version_note(v) is None
    newer = version_note("0.99.0")
    assert newer.startswith("megatron-core 0.99.0 is untested with megatron-ct (tested: 0.16.1")
    assert "newer than the newest tested" in newer
    older = version_note("0.12.3")
    assert "install megatron-core==0.16.1 (Python 3.11)" in older


def test_installed_version_is_logged(caplog):
    check_megatron_core_version.cache_clear()
    with caplog.at_level(logging.INFO, logger="megatron_ct.compat"):
        version = check_megatron_core_version()
    assert version in caplog.text


def test_megatron_core_imports_without_torchs_compiler_on_cpu():
    """On a machine without CUDA, importing megatron_ct then megatron-core leaves torch's compiler
    unimported (~1.2 s of every rank's start) and megatron-core's jit fuser a no-op; torch.compile
    itself is the real one afterwards."""
    import subprocess
    import sys

    code = (
        "import sys, torch, megatron_ct, megatron.core\n"
        "from megatron.core import jit\n"
        "from megatron.core.fusions.fused_bias_swiglu import swiglu\n"
        "x = torch.randn(2, 8)\n"
        "assert torch.equal(swiglu(x), torch.nn.functional.silu(x[:, :4]) * x[:, 4:])\n"
        "print(torch.cuda.is_available(), 'torch._inductor' in sys.modules, jit.jit_fuser(len) is len,\n"
        "      torch.compile.__module__, type(megatron.core.__loader__).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    if out[0] == "True":
        assert out[1:4] == ["True", "False", "torch"]  # on a GPU machine nothing changes
    else:
        assert out[1:] == ["False", "True", "torch", "SourceFileLoader"]
