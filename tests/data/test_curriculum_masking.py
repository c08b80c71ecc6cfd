"""Cross-document masking: a packed sequence's logits equal each document's logits alone.

megatron-core's local attention path (DotProductAttention, unfused softmax) on CPU, with the
batch built by megatron_ct.data.packing from a window of three documents.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from megatron_ct.config.loader import build_config
from megatron_ct.config.validate import validate_for_world
from megatron_ct.data.packing import PackingOptions, build_batch
from megatron_ct.data.stream import Window
from megatron_ct.model.attention import document_mask as document_attention_mask
from megatron_ct.parallel.launch import tcp_init_method

SEQ = 96
DOC_LENGTHS = (20, 35, 41)  # one window of 96 inputs (+1 label token)


@pytest.fixture(scope="module")
def model():
    """A tiny LLaMA (hidden 64, 2 layers) on a world-size-1 gloo group; torn down afterwards."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_ct.model.llama import Numerics, build_model
    from megatron_ct.parallel.device import (
        activate_cpu_device_layer,
        cpu_device_layer_active,
        deactivate_cpu_device_layer,
    )

    cfg = build_config(
        {
            "model": {
                "num_layers": 2,
                "hidden_size": 64,
                "num_attention_heads": 4,
                "num_query_groups": 2,
                "ffn_hidden_size": 128,
                "vocab_size": 512,
                "max_position_embeddings": 128,
                "transformer_impl": "local",
            },
            "train": {"precision": "fp32", "micro_batch_size": 1, "global_batch_size": 1},
            "data": {
                "seq_length": SEQ,
                "datasets": {"d": "unused_prefix"},
                "stages": [{"name": "s", "blend": {"d": 1}, "reset_attention_mask": True, "reset_position_ids": True}],
            },
            "parallel": {"device": "cpu"},
        }
    )
    # megatron-core builds its default causal mask with device='cuda': map it to the CPU.
    was_active = cpu_device_layer_active()
    activate_cpu_device_layer()
    created_pg = not dist.is_initialized()
    if created_pg:
        dist.init_process_group("gloo", init_method=tcp_init_method(), rank=0, world_size=1)
    created_mp = not ps.model_parallel_is_initialized()
    if created_mp:
        ps.initialize_model_parallel(1, 1)
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    chunks, _ = build_model(cfg.model, validate_for_world(cfg, 1), Numerics("fp32", document_masks=True))
    net = chunks[0].eval()
    yield net
    if created_mp:
        ps.destroy_model_parallel()
    if created_pg:
        dist.destroy_process_group()
    if not was_active:
        deactivate_cpu_device_layer()


def logits(net, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return net(
            input_ids=batch["tokens"],
            position_ids=batch["position_ids"],
            attention_mask=batch.get("segment_ids"),  # [b, s]: the attention module masks per document
        ).float()  # [b, s, vocab]


def test_packed_documents_with_masking_match_each_document_alone(model):
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 512, n) for n in DOC_LENGTHS]
    starts = np.cumsum([0, *DOC_LENGTHS[:-1]])
    window = Window(np.concatenate([*docs, [0]]).astype(np.int64), starts.astype(np.int64))  # + 1 label token
    packed = build_batch([window], SEQ, PackingOptions(reset_position_ids=True, reset_attention_mask=True))
    assert packed["segment_ids"].shape == (1, SEQ)
    assert document_attention_mask(packed["segment_ids"]).shape == (1, 1, SEQ, SEQ)
    got = logits(model, packed)[0]
    unmasked = logits(model, build_batch([window], SEQ, PackingOptions()))[0]
    for doc, start in zip(docs, starts, strict=True):
        alone = build_batch([Window(doc.astype(np.int64), np.array([0]))], len(doc) - 1, PackingOptions())
        ref = logits(model, alone)[0]  # the model's own causal path, no explicit mask
        span = slice(start, start + len(doc) - 1)
        torch.testing.assert_close(got[span], ref, rtol=1e-5, atol=1e-5)
        if start > 0:  # without the mask, later documents see the earlier ones
            assert (unmasked[span] - ref).abs().max() > 1e-2
