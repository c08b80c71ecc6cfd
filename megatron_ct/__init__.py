"""megatron-ct: continual pre-training of LLaMA-family models on megatron-core."""

__version__ = "0.1.0"

from megatron_ct.compat import install_eager_fusions_on_cpu as _install

_install()  # megatron-core without torch's compiler on machines without CUDA (compat.py)
