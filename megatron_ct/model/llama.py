"""megatron-core ``GPTModel`` configured as a LLaMA-like decoder of one model family.

One function, :func:`build_model`, turns a :class:`ModelConfig` into the list of model
chunks this rank holds (one per virtual pipeline stage). The layer spec is chosen at run
time: Transformer Engine when importable on GPU, else megatron-core's local modules with
megatron-ct's RMSNorm (FP32 statistics, works with sequence parallelism); its core attention
is ``model.attention_backend`` (megatron_ct/model/attention.py), and the output layer + loss
path is megatron-core's or the chunked one (megatron_ct/model/output.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron_ct.config import Layout, ModelConfig
from megatron_ct.dtypes import torch_dtype
from megatron_ct.families import family_of
from megatron_ct.model.output import loss_model_class, mask_padded_vocab

log = logging.getLogger(__name__)


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron's rule: round the vocabulary up to a multiple of divisible_by * TP, so each
    TP shard of the embedding has the same, GEMM-friendly number of rows."""
    multiple = divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple


def have_transformer_engine() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA install
        return False
    return True


def choose_transformer_impl(requested: str, device: torch.device) -> str:
    """'auto' picks Transformer Engine only on GPU with TE importable (checked at start-up:
    an explicit 'transformer_engine' without them is refused there in one line)."""
    if requested in ("transformer_engine", "local"):
        return requested
    return "transformer_engine" if device.type == "cuda" and have_transformer_engine() else "local"


def have_fused_softmax_kernels() -> bool:
    """megatron-core's fused scale-mask-softmax needs apex's CUDA extension; without it
    (pip-installed megatron-core) FusedScaleMaskSoftmax raises on first use."""
    import importlib.util

    return importlib.util.find_spec("scaled_masked_softmax_cuda") is not None


def params_dtype(precision: str) -> torch.dtype:
    return torch_dtype(precision, "train.precision")


@dataclass(frozen=True)
class Numerics:
    """How the model computes, from the ``train`` section (precision and recomputation), the
    data (explicit document masks) and the trainer (``ddp``: the model will be wrapped in
    megatron-core's DDP, whose buffers the weight gradients can be accumulated into)."""

    precision: str = "fp32"
    recompute_granularity: str | None = None
    document_masks: bool = False
    ddp: bool = False


def transformer_config(m: ModelConfig, layout: Layout, numerics: Numerics):
    """megatron-core TransformerConfig for a model of one family (its layer features come from
    the family's spec, megatron_ct/families)."""
    from megatron.core.transformer import TransformerConfig

    dtype = params_dtype(numerics.precision)
    family = family_of(m)
    if family.moe and numerics.ddp and layout.dims.tp > 1 and not layout.dims.sequence_parallel:
        # megatron-core's MoE layer refuses to train this way (a ValueError in the first forward);
        # evaluation and conversion at TP > 1 without it are fine.
        from megatron_ct.errors import ConfigError

        raise ConfigError(
            f"parallel.sequence_parallel: expected true to train model family {family.name} with tensor "
            "parallelism (megatron-core trains mixtures of experts at TP > 1 only with it), got False"
        )
    on_cpu = not layout.on_gpu
    if on_cpu:
        from megatron_ct.model.rope import install_cpu_rope_kernel

        install_cpu_rope_kernel()  # what apply_rope_fusion runs on CPU
        if numerics.ddp:
            from megatron_ct.parallel.device import install_cpu_wgrad_accumulation

            install_cpu_wgrad_accumulation()  # what gradient_accumulation_fusion runs on CPU
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        ffn_hidden_size=m.ffn_hidden_size,
        kv_channels=m.head_dim,
        qk_layernorm=family.qk_norm,  # Qwen3: RMSNorm per query/key head before RoPE
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True,  # SwiGLU = silu(x W_gate) * (x W_up)
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=family.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_method_std,
        attention_softmax_in_fp32=m.attention_softmax_in_fp32,
        apply_query_key_layer_scaling=False,
        # Parallel layout; must match parallel_state or layer offsets and checkpoint
        # sharding come out wrong.
        tensor_model_parallel_size=layout.dims.tp,
        pipeline_model_parallel_size=layout.dims.pp,
        virtual_pipeline_model_parallel_size=layout.dims.vpp,
        context_parallel_size=layout.dims.cp,
        expert_model_parallel_size=layout.dims.ep,
        sequence_parallel=layout.dims.sequence_parallel,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=numerics.precision == "bf16",
        fp16=numerics.precision == "fp16",
        # Loss is summed per token and divided by the global token count in
        # finalize_model_grads: exact across DP sizes and micro-batch counts.
        calculate_per_token_loss=True,
        use_cpu_initialization=on_cpu,
        perform_initialization=True,
        # Fused kernels need CUDA (and apex/TE); the unfused paths compute the same thing.
        bias_activation_fusion=not on_cpu,
        bias_dropout_fusion=not on_cpu,
        # On CPU: our RoPE kernel (megatron_ct.model.rope), bit-identical to the unfused
        # one, with cos/sin computed once per angle table and no concatenations.
        apply_rope_fusion=on_cpu,
        # On CPU the SwiGLU of the layer spec (megatron_ct.model.swiglu) replaces megatron-core's
        # unfused one; the flag means "the activation module comes from the spec".
        use_te_activation_func=on_cpu,
        # megatron-ct data: curriculum stages with reset_attention_mask pass a block-diagonal
        # mask; the fused causal softmax kernel ignores explicit masks, the unfused one applies
        # them (see megatron_ct/data/packing.py).
        masked_softmax_fusion=not on_cpu and have_fused_softmax_kernels() and not numerics.document_masks,
        # On CPU, where the model gets DDP buffers: the weight gradient is accumulated into them
        # by its GEMM (megatron_ct.parallel.device). megatron-core fails without the buffers.
        gradient_accumulation_fusion=on_cpu and numerics.ddp,
        persist_layer_norm=False,
        # gloo's batch_isend_irecv can pair the interleaved schedule's concurrent
        # same-peer messages wrongly (micro-batches swap); plain isend/irecv keeps order.
        batch_p2p_comm=not on_cpu,
        recompute_granularity=numerics.recompute_granularity,
        # Full recompute: every layer, checkpointing each layer's input.
        recompute_method="uniform" if numerics.recompute_granularity == "full" else None,
        recompute_num_layers=1 if numerics.recompute_granularity == "full" else None,
        **moe_settings(m, layout.dims.tp if layout.dims.sequence_parallel else 1, layout.dims.cp),
    )


def moe_settings(m: ModelConfig, sequence_split: int = 1, cp: int = 1) -> dict:
    """TransformerConfig fields of a mixture of experts (none for a dense model).

    HF's routing (Mixtral, Qwen3-MoE) is a softmax over all experts' logits, then the top k; with
    renormalisation (``moe_norm_topk_prob``) that equals megatron-core's softmax over the top-k
    logits (``moe_router_pre_softmax=False``), without it the top k of the full softmax
    (``pre_softmax=True``). Experts are megatron-core's SequentialMLP (``moe_grouped_gemm=False``:
    the grouped GEMM needs TE/CUDA), tokens travel by the all-to-all dispatcher (gloo has
    ``all_to_all_single``). By default no capacity limit, so no token is dropped, as in HF; with
    ``moe_expert_capacity_factor`` megatron-core drops the token slots past each expert's capacity
    (``apply_router_token_dropping``) and the dispatcher sends the smaller routing map.

    The load-balancing loss is megatron-core's, over each micro-batch's tokens. Where those are
    split over ranks (sequence parallelism: ``sequence_split`` = TP; context parallelism: CP),
    megatron-core 0.16.1 computes the loss over the whole micro-batch but scales its gradient by
    the rank's own token count (``valid_token_count=local_num_tokens``) where the LM loss is
    scaled by the micro-batch's: its gradient comes out ``sequence_split * cp`` times too small.
    The coefficient is multiplied by that factor to compensate (checked against one process). The
    z-loss has the same flaw (megatron-core divides its coefficient by TP x CP, then scales by the
    rank's own tokens) and gets the same compensation.
    """
    if not m.num_experts:
        return {}
    return dict(
        num_moe_experts=m.num_experts,
        moe_ffn_hidden_size=m.moe_ffn_hidden_size,
        moe_router_topk=m.moe_router_topk,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not m.moe_norm_topk_prob,
        moe_router_load_balancing_type="aux_loss" if m.moe_aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=m.moe_aux_loss_coeff * sequence_split * cp,
        moe_z_loss_coeff=m.moe_z_loss_coeff * sequence_split * cp if m.moe_z_loss_coeff > 0 else None,
        moe_expert_capacity_factor=m.moe_expert_capacity_factor,
        moe_grouped_gemm=False,
        moe_token_dispatcher_type="alltoall",
    )


@dataclass(frozen=True)
class ModelInfo:
    """What a built model is, for logs, FLOP counts and checkpoint metadata."""

    transformer_impl: str
    attention_backend: str
    norm_impl: str
    padded_vocab_size: int
    true_vocab_size: int
    num_parameters: int  # on this rank, all its chunks


def layer_spec(
    impl: str, num_layers: int, qk_layernorm: bool = False, attention: str | None = None, num_experts: int | None = None
):
    """Block spec: per-layer modules plus the final norm; ``attention`` (a resolved
    ``model.attention_backend``) replaces the spec's ``core_attention`` unless None or 'te';
    ``num_experts``: every MLP a mixture of that many experts (SequentialMLP)."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    from megatron_ct.model.attention import BlockMaskCache, core_attention_module
    from megatron_ct.model.rmsnorm import RMSNorm
    from megatron_ct.model.swiglu import SwiGLU

    if impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine import TENorm
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        spec = get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=False, qk_layernorm=qk_layernorm
        )
        final_norm = TENorm
    else:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        spec = get_gpt_layer_local_spec(
            num_experts=num_experts, moe_grouped_gemm=False, normalization="RMSNorm", qk_layernorm=qk_layernorm
        )
        # megatron-core's torch fallback norm refuses sequence parallelism and computes in
        # the input dtype; ours keeps FP32 statistics and marks weights for SP reduction.
        spec.submodules.input_layernorm = RMSNorm
        spec.submodules.pre_mlp_layernorm = RMSNorm
        # Used where the config sets use_te_activation_func (on CPU, see transformer_config).
        mlp = spec.submodules.mlp.submodules
        (mlp.experts.submodules if num_experts else mlp).activation_func = SwiGLU
        if qk_layernorm:  # on [s, b, heads, head_dim], normalised over head_dim
            spec.submodules.self_attention.submodules.q_layernorm = RMSNorm
            spec.submodules.self_attention.submodules.k_layernorm = RMSNorm
        final_norm = RMSNorm
    if attention not in (None, "te"):
        # One block-mask cache per model: every layer of a micro-batch shares its mask.
        spec.submodules.self_attention.submodules.core_attention = core_attention_module(attention, BlockMaskCache())
    return spec, final_norm, TransformerBlockSubmodules


def build_model(
    m: ModelConfig, layout: Layout, numerics: Numerics | None = None
) -> tuple[list[torch.nn.Module], ModelInfo]:
    """Build this rank's model chunks (not yet wrapped in DDP), on ``layout.device``."""
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_block import get_num_layers_to_build

    from megatron_ct.compat import check_megatron_core_version
    from megatron_ct.model.attention import choose_attention_backend, describe_attention
    from megatron_ct.model.rmsnorm import describe_norm_impl

    numerics = numerics or Numerics()
    check_megatron_core_version()
    impl = choose_transformer_impl(m.transformer_impl, layout.device)
    attention = choose_attention_backend(
        m.attention_backend, impl, layout.device, numerics.document_masks, layout.dims.cp
    )
    log.info(describe_attention(attention, m.attention_softmax_in_fp32))
    tcfg = transformer_config(m, layout, numerics)
    vocab = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, layout.dims.tp)
    spec, final_norm, BlockSubmodules = layer_spec(impl, m.num_layers, family_of(m).qk_norm, attention, m.num_experts)
    if m.num_experts:
        from megatron_ct.compat import define_moe_router_gemm

        define_moe_router_gemm()
    model_class = loss_model_class(m.loss_chunk_size, m.vocab_size)

    chunks = []
    for vp_stage in range(layout.dims.vpp or 1):
        vp = vp_stage if layout.dims.vpp else None
        n = get_num_layers_to_build(tcfg, vp_stage=vp)
        model = model_class(
            config=tcfg,
            transformer_layer_spec=BlockSubmodules(layer_specs=[spec] * n, layer_norm=final_norm),
            vocab_size=vocab,
            max_sequence_length=m.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            share_embeddings_and_output_weights=not m.untie_embeddings_and_output_weights,
            position_embedding_type="rope",
            rotary_base=int(m.rotary_base),
            parallel_output=True,
            vp_stage=vp,
        )
        if m.rope_scaling is not None or m.rotary_base != int(m.rotary_base):
            from megatron_ct.model.rope import RopeScaling, install_rope

            install_rope(
                model,
                m.head_dim,
                m.rotary_base,
                RopeScaling.from_hf_dict(m.rope_scaling or {"rope_type": "default"}),
                m.max_position_embeddings,
            )
        if tcfg.gradient_accumulation_fusion and model.pre_process:
            from megatron_ct.model.embedding import accumulate_embedding_grads

            accumulate_embedding_grads(model)  # the lookup's gradient into the DDP buffer, as the GEMMs
        if tcfg.gradient_accumulation_fusion:
            from megatron_ct.model.linear import lean_linears

            lean_linears(model)  # one TP rank: one autograd function per GEMM, not three
        if model.post_process and vocab > m.vocab_size:
            mask_padded_vocab(model, m.vocab_size)  # the plain path's logits (the chunked loss fills its own)
        if layout.on_gpu:
            model.to(layout.device)
        chunks.append(model)

    info = ModelInfo(
        transformer_impl=impl,
        attention_backend=attention,
        norm_impl=describe_norm_impl() if impl == "local" else "transformer_engine.TENorm",
        padded_vocab_size=vocab,
        true_vocab_size=m.vocab_size,
        num_parameters=sum(p.numel() for c in chunks for p in c.parameters()),
    )
    return chunks, info
