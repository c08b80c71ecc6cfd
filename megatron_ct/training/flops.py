"""Model FLOPs per token and peak device throughput, for TFLOP/s and MFU."""

from __future__ import annotations

from megatron_ct.config import ModelConfig

# Dense bf16/fp16 tensor-core peak TFLOP/s (no sparsity), by a substring of
# torch.cuda.get_device_name(). Order matters: more specific names first.
PEAK_TFLOPS: list[tuple[str, float]] = [
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM / NVL
    ("H800", 989.0),
    ("H20", 148.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("A6000", 155.0),
    ("A10", 125.0),
    ("V100", 125.0),
    ("4090", 165.0),
    ("3090", 71.0),
]


def peak_tflops_for(device_name: str) -> float | None:
    for key, value in PEAK_TFLOPS:
        if key in device_name:
            return value
    return None


def flops_per_token(m: ModelConfig, seq_length: int, padded_vocab: int) -> float:
    """Training FLOPs (forward + backward = 3x forward) per token, counting matmuls only.

    Attention scores and weighted sum are counted over the full sequence (no causal
    discount), the convention of Megatron-LM's reports, so MFU figures compare.
    """
    h, s = m.hidden_size, seq_length
    q, kv = m.num_attention_heads * m.head_dim, m.num_query_groups * m.head_dim  # h, h for LLaMA
    per_layer = (
        2 * h * (q + 2 * kv)  # QKV projection
        + 2 * 2 * s * q  # QK^T and attention x V
        + 2 * q * h  # output projection
        + 2 * 3 * h * m.ffn_hidden_size  # SwiGLU: gate, up, down
    )
    forward = m.num_layers * per_layer + 2 * h * padded_vocab  # + logits
    return 3.0 * forward
