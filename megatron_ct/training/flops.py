"""Peak device throughput, for MFU. (Model FLOPs per token are the family's:
:meth:`megatron_ct.families.spec.ModelFamily.flops_per_token`.)"""

from __future__ import annotations

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
