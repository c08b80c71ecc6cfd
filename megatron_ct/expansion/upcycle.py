"""Sparse upcycling: a dense checkpoint becomes a mixture of experts whose experts start as copies
of its MLP (Komatsuzaki et al., 2022).

Every layer's SwiGLU MLP (``linear_fc1`` ``[2f, h]``, ``linear_fc2`` ``[h, f]``) is copied into
each of ``num_experts`` experts of width f (``[L, E, 2f, h]``, ``[L, E, h, f]``), and each layer
gets a router ``[E, h]`` drawn from N(0, init_method_std). Everything else is copied as it is.
The dense family becomes the MoE family with the same layer features (llama -> mixtral, qwen3 ->
qwen3_moe; megatron_ct/families).

The routing probabilities of the ``topk`` chosen experts are renormalised to sum to 1
(``moe_norm_topk_prob``), so while the experts are copies the MoE layer's output is
``sum_k p_k MLP(x) = MLP(x)`` whatever the router says: the upcycled model computes the dense
model's function, and its first training step starts from the dense model's loss. ``noise``
(relative to each tensor's standard deviation, per expert) breaks the symmetry between experts
from the first step at the cost of that equality; without it the router's random weights and the
load-balancing loss separate them.

Works on our dist checkpoints at any TP/PP they were saved at (global coordinates), streamed one
layer (one expert of a layer) at a time; the output holds weights only (iteration 0).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from megatron_ct.checkpoint.dist_io import ChunkSpec, DistCheckpointReader
from megatron_ct.checkpoint.keys import LAYER_PREFIX
from megatron_ct.checkpoint.rewrite import copied, model_keys, open_checkpoint, write_weights_only
from megatron_ct.errors import ConversionError
from megatron_ct.families import ModelFamily, all_families, get_family

DENSE_MLP = {  # dense key -> the experts' key
    LAYER_PREFIX + "mlp.linear_fc1.weight": LAYER_PREFIX + "mlp.experts.experts.linear_fc1.weight",
    LAYER_PREFIX + "mlp.linear_fc2.weight": LAYER_PREFIX + "mlp.experts.experts.linear_fc2.weight",
}
ROUTER = LAYER_PREFIX + "mlp.router.weight"


@dataclass(frozen=True)
class UpcyclePlan:
    """What the upcycled model is: its family and the model-config fields that change."""

    dense: str
    family: str
    num_experts: int
    topk: int
    noise: float
    seed: int

    def model_fields(self, ffn_hidden_size: int) -> dict:
        return {
            "family": self.family,
            "num_experts": self.num_experts,
            "moe_ffn_hidden_size": ffn_hidden_size,
            "moe_router_topk": self.topk,
            "moe_norm_topk_prob": True,  # the upcycled model equals the dense one only so
        }

    def overrides(self, ffn_hidden_size: int) -> str:
        """The recipe's ``model.*`` overrides for the upcycled checkpoint."""
        return " ".join(f"model.{k}={v}" for k, v in self.model_fields(ffn_hidden_size).items())


def moe_family_for(dense: ModelFamily) -> ModelFamily:
    """The mixture-of-experts family with ``dense``'s layer features."""
    if dense.moe:
        raise ConversionError(f"model.family={dense.name}: already a mixture of experts; expected a dense model")
    for family in all_families().values():
        if family.moe and (family.qkv_bias, family.qk_norm) == (dense.qkv_bias, dense.qk_norm):
            return family
    moe = ", ".join(f.name for f in all_families().values() if f.moe)
    raise ConversionError(
        f"model.family={dense.name}: no mixture-of-experts family has its layers (QKV bias={dense.qkv_bias}, "
        f"q/k norm={dense.qk_norm}); expected a dense model of a family one of {moe} upcycles"
    )


def _generator(key: str, seed: int, layer: int, expert: int = -1) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(f"{key}/{layer}/{expert}".encode()))


def plan_chunks(reader: DistCheckpointReader, plan: UpcyclePlan, num_layers: int, init_std: float) -> list[ChunkSpec]:
    """Every dense tensor copied, the MLP's once per expert, plus a router per layer."""
    chunks = []
    e_count = plan.num_experts
    for key in model_keys(reader):
        if key not in DENSE_MLP:
            chunks.extend(copied(reader, key))
            continue
        shape, dtype = reader.shape(key), reader.dtype(key)  # [L, ...]
        out_shape = (shape[0], e_count, *shape[1:])
        for i in range(shape[0]):
            for e in range(e_count):

                def produce(k=key, i=i, e=e, shape=shape) -> torch.Tensor:
                    w = reader.read(k, (i,) + (0,) * (len(shape) - 1), (1, *shape[1:]))  # [1, ...] of layer i
                    if plan.noise > 0:
                        g = _generator(k, plan.seed, i, e)
                        noise = torch.randn(w.shape, generator=g, dtype=torch.float32)
                        w = (w.float() + plan.noise * w.float().std() * noise).to(w.dtype)
                    return w.unsqueeze(1)  # [1, 1, ...]

                offsets = (i, e) + (0,) * (len(shape) - 1)
                sizes = (1, 1, *shape[1:])
                chunks.append(ChunkSpec(DENSE_MLP[key], out_shape, offsets, sizes, dtype, produce))
    embedding = "embedding.word_embeddings.weight"
    hidden, dtype = reader.shape(embedding)[1], reader.dtype(embedding)
    for i in range(num_layers):

        def router(i=i) -> torch.Tensor:
            g = _generator(ROUTER, plan.seed, i)
            return (init_std * torch.randn((1, e_count, hidden), generator=g)).to(dtype)

        chunks.append(ChunkSpec(ROUTER, (num_layers, e_count, hidden), (i, 0, 0), (1, e_count, hidden), dtype, router))
    return chunks


def upcycle(
    ckpt: str,
    out_dir: str,
    num_experts: int,
    topk: int,
    *,
    noise: float = 0.0,
    seed: int = 0,
    overwrite: bool = False,
) -> tuple[UpcyclePlan, dict]:
    """Write the upcycled checkpoint to ``out_dir`` (a save root: ``iter_0000000`` + tracker);
    returns the plan and the upcycled model's config dict."""
    path, reader, meta = open_checkpoint(ckpt)
    model = dict(meta.model)
    dense = get_family(model.get("family") or "llama", key=f"{path}: model.family")
    target = moe_family_for(dense)
    if not (isinstance(num_experts, int) and num_experts >= 1):
        raise ConversionError(f"--num-experts {num_experts}: expected an integer >= 1")
    if not (isinstance(topk, int) and 2 <= topk <= num_experts):
        # The chosen weights are renormalised (what keeps the dense function): one expert's is
        # always 1 and its router would get no gradient (megatron-core refuses top-1 so).
        raise ConversionError(
            f"--topk {topk}: expected an integer in [2, --num-experts={num_experts}] (top-1 weights renormalised "
            "to 1 give the router no gradient)"
        )
    if not (noise >= 0 and noise < float("inf")):
        raise ConversionError(f"--noise {noise}: expected a number >= 0")
    missing = [k for k in DENSE_MLP if k not in reader.tensors]
    if missing:
        raise ConversionError(f"{path}: missing tensor {missing[0]} (expected a dense model's MLP)")
    plan = UpcyclePlan(dense.name, target.name, num_experts, topk, float(noise), seed)
    model.update(plan.model_fields(model["ffn_hidden_size"]))
    from megatron_ct.config import ModelConfig

    try:
        ModelConfig(**model)  # the upcycled config must be one the trainer accepts
    except ValueError as e:
        raise ConversionError(f"{path}: {e}") from None
    meta.config = {**meta.config, "model": model}
    # The HF record named a dense architecture and its config.json: keep only where it came from
    # (tokenizer files), so an export writes the MoE family's architecture.
    if meta.hf:
        meta.hf = {k: v for k, v in meta.hf.items() if k == "source"} or None
    meta.expansion = {
        "source": path,
        "upcycle": {"from": dense.name, "num_experts": num_experts, "topk": topk, "noise": plan.noise, "seed": seed},
    }
    chunks = plan_chunks(reader, plan, model["num_layers"], float(model.get("init_method_std", 0.02)))
    write_weights_only(out_dir, chunks, meta, overwrite)
    return plan, model
