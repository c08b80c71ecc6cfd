"""Attention backends (megatron_ct/model/attention.py): same numbers as megatron-core's local attention.

Module level: SDPA and FlexAttention against ``DotProductAttention`` for GQA, with no mask, a
``[b, 1, s, s]`` document mask and ``[b, s]`` segment ids. Model level (tests/model/parity_worker.py
under torchrun, TP1 and TP2): logits and parameter gradients of a tiny GQA LLaMA built with each
backend. On CPU, torch's FlexAttention has no backward: its training steps take the SDPA path
with the same mask, so the gradients checked for 'flex' here are that path's (FlexAttention's
own backward runs in bench/gpu_check.sh).
"""

import json
import math
from pathlib import Path

import pytest
import torch

from megatron_ct.config import load_config
from megatron_ct.errors import ConfigError
from megatron_ct.model import attention as attn
from megatron_ct.model.attention import (
    BlockMaskCache,
    FlexCoreAttention,
    LocalAttention,
    SDPAttention,
    choose_attention_backend,
    document_mask,
)
from megatron_ct.parallel.device import activate_cpu_device_layer, deactivate_cpu_device_layer

HERE = Path(__file__).resolve().parent


@pytest.fixture
def cpu_device_layer():
    """megatron-core's softmax builds its default causal mask with device='cuda'; its dropout
    forks the tensor-parallel RNG tracker (seeded here, under the device layer)."""
    from megatron.core import tensor_parallel

    activate_cpu_device_layer()
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    yield
    deactivate_cpu_device_layer()


def test_auto_choice(monkeypatch):
    monkeypatch.setattr(attn, "_flex_compilable", lambda: True)  # as on a GPU machine with Triton
    assert choose_attention_backend("auto", "local", torch.device("cpu"), document_masks=False) == "sdpa"
    assert choose_attention_backend("auto", "local", torch.device("cpu"), document_masks=True) == "sdpa"
    assert choose_attention_backend("auto", "local", torch.device("cuda"), document_masks=False) == "sdpa"
    assert choose_attention_backend("auto", "local", torch.device("cuda"), document_masks=True) == "flex"
    assert choose_attention_backend("auto", "transformer_engine", torch.device("cuda"), document_masks=False) == "te"
    # TE's causal attention ignores document masks: flex inside the TE layer spec instead.
    assert choose_attention_backend("auto", "transformer_engine", torch.device("cuda"), document_masks=True) == "flex"
    monkeypatch.setattr(attn, "_flex_compilable", lambda: False)  # no Triton / C compiler: SDPA takes the mask
    assert choose_attention_backend("auto", "local", torch.device("cuda"), document_masks=True) == "sdpa"
    for explicit in ("sdpa", "flex", "local"):
        assert choose_attention_backend(explicit, "local", torch.device("cpu"), document_masks=True) == explicit
    with pytest.raises(ConfigError, match=r"^model\.attention_backend: 'te' needs the Transformer Engine layer spec"):
        choose_attention_backend("te", "local", torch.device("cuda"), document_masks=False)


def test_config_refuses_unknown_backend_and_te_with_local_layers():
    with pytest.raises(ConfigError, match=r"^model\.attention_backend: expected one of auto, te, sdpa, flex, local"):
        load_config(None, ["model.attention_backend=flash"])
    with pytest.raises(ConfigError, match=r"^model\.attention_backend: expected not 'te' with model\.transformer_impl"):
        load_config(None, ["model.attention_backend=te", "model.transformer_impl=local"])
    assert load_config(None, ["--attention-backend", "flex"]).model.attention_backend == "flex"


def _doc_stage_config(backend: str):
    return load_config(
        None,
        [
            f"model.attention_backend={backend}",
            "data.datasets={d: some_prefix}",
            "data.stages=[{name: s, blend: {d: 1}, reset_attention_mask: true}]",
        ],
    )


def test_document_masks_are_refused_only_for_te(monkeypatch):
    from megatron_ct.config import validate_for_world
    from megatron_ct.model import llama
    from megatron_ct.training.startup import _check_attention_for_document_masks

    def check(backend, device):
        cfg = _doc_stage_config(backend)
        _check_attention_for_document_masks(cfg, validate_for_world(cfg, 1, torch.device(device)))

    for backend in ("local", "sdpa", "flex", "auto"):
        check(backend, "cpu")  # accepted
    # With Transformer Engine on GPU: 'auto' takes flex for document masks, 'te' is refused
    # (explicitly asked for, already when the config is built).
    monkeypatch.setattr(llama, "have_transformer_engine", lambda: True)
    check("auto", "cuda")
    with pytest.raises(ConfigError, match=r"^data\.stages\[0\]\.reset_attention_mask: needs model\.attention_backend"):
        check("te", "cuda")


# ----------------------------------------------------------------------------- module level


def make_config(heads=4, groups=2, head_dim=16, dtype=torch.float32):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=1,
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        num_query_groups=groups,
        attention_dropout=0.0,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        attention_softmax_in_fp32=True,
        masked_softmax_fusion=False,
    )


def modules(config):
    from megatron.core.transformer.enums import AttnMaskType

    causal = AttnMaskType.causal
    return {
        "local": LocalAttention(config, 1, causal, "self"),
        "sdpa": SDPAttention(config, 1, causal, "self"),
        "flex": FlexCoreAttention(config, 1, causal, "self"),
    }


def qkv(s=40, b=2, heads=4, groups=2, d=16, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(s, b, heads, d, generator=g) * scale  # [sq, b, np, hn]
    k = torch.randn(s, b, groups, d, generator=g) * scale  # [sk, b, ng, hn]
    v = torch.randn(s, b, groups, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def segments(s=40):
    seg = torch.zeros(2, s, dtype=torch.long)
    seg[0, 9:] = 1
    seg[0, 25:] = 2
    seg[1, 31:] = 1
    return seg


def reference(q, k, v, allowed):
    """fp64 attention; ``allowed [b, s, s]`` True = attend."""
    rep = q.shape[2] // k.shape[2]
    q64, k64, v64 = (t.double() for t in (q, k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)))
    scores = torch.einsum("sbnd,tbnd->bnst", q64, k64) / math.sqrt(q.shape[-1])
    probs = torch.softmax(scores.masked_fill(~allowed[:, None], float("-inf")), dim=-1)
    return torch.einsum("bnst,tbnd->sbnd", probs, v64).reshape(q.shape[0], q.shape[1], -1)


@pytest.mark.parametrize("mask_kind", ["none", "dense", "segments"])
def test_modules_equal_local_attention_fp32(mcore_tp1, cpu_device_layer, mask_kind):
    q, k, v = qkv()
    seg = segments()
    mask = {"none": None, "dense": document_mask(seg), "segments": seg}[mask_kind]
    allowed = ~document_mask(seg)[:, 0] if mask is not None else torch.tril(torch.ones(40, 40, dtype=torch.bool))[None]
    ref = reference(q, k, v, allowed.expand(2, 40, 40))
    outs = {name: m(q, k, v, mask) for name, m in modules(make_config()).items()}
    for name, out in outs.items():
        assert out.shape == (40, 2, 64), name
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(outs["sdpa"], outs["local"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(outs["flex"], outs["local"], rtol=1e-6, atol=1e-6)


def test_sdpa_gradients_equal_local_attention(mcore_tp1, cpu_device_layer):
    q, k, v = qkv()
    upstream = torch.randn(40, 2, 64, generator=torch.Generator().manual_seed(1))
    grads = {}
    for name, m in modules(make_config()).items():
        if name == "flex":
            continue  # no FlexAttention backward on CPU
        for mask in (None, segments()):
            ins = [t.clone().requires_grad_() for t in (q, k, v)]
            m(*ins, mask).backward(upstream)
            grads[name, mask is None] = [t.grad for t in ins]
    for causal_only in (True, False):
        for a, e in zip(grads["sdpa", causal_only], grads["local", causal_only], strict=True):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_bf16_fused_softmax_is_at_least_as_accurate_as_local(mcore_tp1, cpu_device_layer):
    """The FP32 softmax claim: sdpa/flex keep the scores in FP32; local rounds them to bf16."""
    q, k, v = qkv(dtype=torch.bfloat16, scale=4.0)  # large logits, as in the softmax FP32 test
    ref = reference(q, k, v, torch.tril(torch.ones(40, 40, dtype=torch.bool))[None].expand(2, 40, 40))
    errors = {
        name: (m(q, k, v, None).double() - ref).norm().item() / ref.norm().item()
        for name, m in modules(make_config(dtype=torch.bfloat16)).items()
    }
    print(f"\nbf16 relative error vs fp64: {errors}")
    assert errors["sdpa"] <= errors["local"] * 1.05
    assert errors["flex"] <= errors["local"] * 1.05


def test_block_mask_built_once_per_micro_batch(monkeypatch):
    built = []
    real = attn._build_block_mask
    monkeypatch.setattr(attn, "_build_block_mask", lambda *a: built.append(a) or real(*a))
    cache = BlockMaskCache(capacity=2)
    seg = segments()
    for _layer in range(3):  # the layers of one forward pass see the same tensor
        cache.get(seg, 2, 40, 40, torch.device("cpu"))
    assert len(built) == 1
    cache.get(seg.detach(), 2, 40, 40, torch.device("cpu"))  # a recompute's detached alias
    assert len(built) == 1
    other = segments().flip(-1)  # another micro-batch
    cache.get(other, 2, 40, 40, torch.device("cpu"))
    seg.add_(0)  # modified in place: a new version, not the cached mask
    cache.get(seg, 2, 40, 40, torch.device("cpu"))
    assert len(built) == 3
    cache.get(None, 2, 40, 40, torch.device("cpu"))
    cache.get(None, 2, 40, 40, torch.device("cpu"))
    assert len(built) == 4


# ----------------------------------------------------------------------------- model level


def run_worker(tmp_path, nproc: int, mode: str, *overrides: str) -> list[dict]:
    from launch import run_torchrun

    run_torchrun(nproc, HERE / "parity_worker.py", [mode, str(tmp_path), *overrides], timeout=600)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(nproc)]


def check_attention_results(results: list[dict]) -> None:
    for r in results:
        assert r["local_dense_vs_segments"] == 0.0  # the two mask formats are the same mask
        assert r["local_masked_vs_unmasked"] > 1e-2  # and the mask matters
        for backend in ("sdpa", "flex"):
            for kind in ("none", "dense", "segments"):
                assert r[f"{backend}_{kind}_logits"] <= 1e-5 * max(1.0, r["logit_scale"]), (backend, kind, r)
                assert r[f"{backend}_{kind}_grads"] <= 1e-5, (backend, kind, r)


@pytest.mark.slow
def test_model_logits_and_grads_equal_local_tp1(tmp_path):
    check_attention_results(run_worker(tmp_path, 1, "attention"))


@pytest.mark.slow
def test_model_logits_and_grads_equal_local_tp2(tmp_path):
    check_attention_results(run_worker(tmp_path, 2, "attention"))
