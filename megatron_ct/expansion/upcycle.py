"""Sparse upcycling: a dense checkpoint becomes a mixture of experts whose experts start as copies
of its MLP (Komatsuzaki et al., 2022), or of slices of it (fine-grained experts).

Every layer's SwiGLU MLP (``linear_fc1`` ``[2f, h]`` = ``cat([gate, up])``, ``linear_fc2``
``[h, f]``) is cut into ``granularity`` G slices of width f/G along its hidden dimension (slice s:
gate and up rows and down columns ``[s f/G, (s+1) f/G)``; the MLP's output is the sum of its
slices' outputs, SwiGLU being elementwise there). Expert e of the ``num_experts`` E (a multiple of
G) is a copy of slice ``e mod G`` (``[L, E, 2f/G, h]``, ``[L, E, h, f/G]``); G = 1 (the default)
copies the whole MLP into every expert. Each layer gets a router ``[E, h]`` drawn from
N(0, init_method_std), its rows tied within each group of G consecutive experts (one full MLP's
slices), as in the "virtual group" initialisation of He et al. (2024, "Upcycling Large Language
Models into Mixture of Experts"). Everything else is copied as it is. The dense family becomes the
MoE family with the same layer features (llama -> mixtral, qwen3 -> qwen3_moe; megatron_ct/families).

The routing probabilities of the ``topk`` k chosen experts are renormalised to sum to 1
(``moe_norm_topk_prob``). With G = 1 and copies the MoE layer's output is ``sum_k p_k MLP(x) =
MLP(x)`` whatever the router says. With G > 1, k is a multiple of G: a group's experts have equal
router scores, so the top k are k/G whole groups, each group's experts get equal weights summing
to the group's share, and with the down projections scaled by G the output is again
``sum_groups p_g sum_s slice_s(x) = MLP(x)``. Either way the upcycled model computes the dense
model's function and its first training step starts from the dense model's loss; with k = G a
token passes exactly the dense model's MLP parameters (equal active parameters). ``noise``
(relative to each tensor's standard deviation, per expert) breaks the symmetry between experts
from the first step at the cost of that equality; without it the router's random weights, the
slices' different outputs and the load-balancing loss separate them.

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
    granularity: int = 1

    def model_fields(self, ffn_hidden_size: int) -> dict:
        return {
            "family": self.family,
            "num_experts": self.num_experts,
            "moe_ffn_hidden_size": ffn_hidden_size // self.granularity,
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


FC1, FC2 = DENSE_MLP


def _mlp_slice(reader: DistCheckpointReader, key: str, layer: int, s: int, g: int) -> torch.Tensor:
    """Slice ``s`` of ``g`` of layer ``layer``'s ``linear_fc1`` (its gate and up rows) or
    ``linear_fc2`` (its columns, times ``g``: the slices' weights sum to 1/g of a group's)."""
    shape = reader.shape(key)  # [L, 2f, h] or [L, h, f]
    if key == FC1:
        f, h = shape[1] // 2, shape[2]
        w = f // g
        gate, up = (reader.read(key, (layer, half * f + s * w, 0), (1, w, h)) for half in (0, 1))
        return torch.cat([gate, up], dim=1)
    h, f = shape[1], shape[2]
    w = reader.read(key, (layer, 0, s * (f // g)), (1, h, f // g))
    return w if g == 1 else (w.float() * g).to(w.dtype)


def plan_chunks(reader: DistCheckpointReader, plan: UpcyclePlan, num_layers: int, init_std: float) -> list[ChunkSpec]:
    """Every dense tensor copied, the MLP's (slices) once per expert, plus a router per layer."""
    chunks = []
    e_count, g = plan.num_experts, plan.granularity
    for key in model_keys(reader):
        if key not in DENSE_MLP:
            chunks.extend(copied(reader, key))
            continue
        shape, dtype = reader.shape(key), reader.dtype(key)  # [L, 2f, h] or [L, h, f]
        expert_shape = (shape[1] // g, shape[2]) if key == FC1 else (shape[1], shape[2] // g)
        out_shape = (shape[0], e_count, *expert_shape)
        for i in range(shape[0]):
            for e in range(e_count):

                def produce(k=key, i=i, e=e) -> torch.Tensor:
                    w = _mlp_slice(reader, k, i, e % g, g)  # [1, ...] of layer i
                    if plan.noise > 0:
                        gen = _generator(k, plan.seed, i, e)
                        noise = torch.randn(w.shape, generator=gen, dtype=torch.float32)
                        w = (w.float() + plan.noise * w.float().std() * noise).to(w.dtype)
                    return w.unsqueeze(1)  # [1, 1, ...]

                offsets = (i, e, 0, 0)
                sizes = (1, 1, *expert_shape)
                chunks.append(ChunkSpec(DENSE_MLP[key], out_shape, offsets, sizes, dtype, produce))
    embedding = "embedding.word_embeddings.weight"
    hidden, dtype = reader.shape(embedding)[1], reader.dtype(embedding)
    for i in range(num_layers):

        def router(i=i) -> torch.Tensor:
            gen = _generator(ROUTER, plan.seed, i)
            rows = init_std * torch.randn((1, e_count // g, hidden), generator=gen)
            return rows.repeat_interleave(g, dim=1).to(dtype)  # tied within each group of g experts

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
    granularity: int = 1,
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
    ffn = model["ffn_hidden_size"]
    if not (isinstance(granularity, int) and granularity >= 1 and ffn % granularity == 0):
        raise ConversionError(
            f"--granularity {granularity}: expected an integer >= 1 dividing the MLP width "
            f"(model.ffn_hidden_size={ffn})"
        )
    for flag, value in (("--num-experts", num_experts), ("--topk", topk)):
        if value % granularity:
            raise ConversionError(
                f"{flag} {value}: expected a multiple of --granularity={granularity} (whole groups of one MLP's slices)"
            )
    plan = UpcyclePlan(dense.name, target.name, num_experts, topk, float(noise), seed, granularity)
    model.update(plan.model_fields(ffn))
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
        "upcycle": {
            "from": dense.name,
            "num_experts": num_experts,
            "topk": topk,
            "granularity": granularity,
            "noise": plan.noise,
            "seed": seed,
        },
    }
    chunks = plan_chunks(reader, plan, model["num_layers"], float(model.get("init_method_std", 0.02)))
    write_weights_only(out_dir, chunks, meta, overwrite)
    return plan, model
