"""megatron-ct: continual pre-training of LLaMA-family models on megatron-core."""

__version__ = "0.1.0"
