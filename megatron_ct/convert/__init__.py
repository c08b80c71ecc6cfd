"""Hugging Face <-> megatron-ct checkpoint conversion, streamed one tensor at a time.

- :mod:`~megatron_ct.convert.hf_layout`: which HF architectures map onto our LLaMA
  ``ModelConfig``, the tensor names on both sides and the QKV / SwiGLU (de)interleaving.
- :mod:`~megatron_ct.convert.hf_files`: reading HF weights (safetensors, ``.bin``) and
  writing sharded safetensors with an index, one tensor in memory at a time.
- :mod:`~megatron_ct.checkpoint.dist_io`: writing and region-reading megatron-core dist
  checkpoints (PyTorch DCP ``torch_dist`` format) without holding the model.
- :mod:`~megatron_ct.convert.hf_to_ct` / :mod:`~megatron_ct.convert.ct_to_hf`: the two
  directions; ``tools/convert_checkpoint.py`` is their command line.
"""

from megatron_ct.errors import ConversionError

__all__ = ["ConversionError"]
