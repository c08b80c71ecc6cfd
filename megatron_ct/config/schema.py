"""The one typed configuration of a megatron-ct run.

The defaults describe the embedded default run (a tiny LLaMA on synthetic data, CPU
friendly); real recipes in ``examples/`` set every size explicitly.

Each section is a dataclass with a docstring per field; checks that need only the
section itself live in its ``__post_init__``. Checks that need the world size
(divisibility by TP/PP/DP) live in :func:`megatron_ct.config.validate.validate_for_world`,
which every rank runs before the first collective. Field names follow Megatron-LM's
flags (``--tensor-model-parallel-size`` -> ``tensor_model_parallel_size``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from megatron_ct.errors import ConfigError


def _require(cond: bool, key: str, expected: str, got: Any) -> None:
    if not cond:
        raise ConfigError(f"{key}: expected {expected}, got {got!r}")


def _one_of(value: Any, key: str, choices: tuple) -> None:
    _require(value in choices, key, "one of " + ", ".join(map(str, choices)), value)


def _number(value: Any, key: str, expected: str, ok: bool) -> None:
    """A finite number satisfying ``ok`` (NaN and inf are refused: they train silently to NaN)."""
    finite = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    _require(finite and ok, key, expected, value)


LR_CLASSES = ("embedding", "output", "new_vocab_rows", "new_blocks", "experts", "router", "body")
MOE_CLASSES = ("experts", "router")  # LR classes and trainable_params aliases of a mixture of experts


def check_lr_mult(mult: Any, key: str) -> None:
    """``{class: multiplier}``: known classes, finite multipliers >= 0."""
    if mult is None:
        return
    _require(isinstance(mult, dict), key, "a mapping class -> multiplier or null", mult)
    for name, value in mult.items():
        _require(name in LR_CLASSES, f"{key}.{name}", "one of " + ", ".join(LR_CLASSES) + " (unknown class)", name)
        _number(value, f"{key}.{name}", "a finite number >= 0", isinstance(value, (int, float)) and value >= 0)


def check_param_patterns(patterns: list[str] | None, key: str) -> None:
    """Syntax of ``trainable_params`` patterns (what they match is checked against the model)."""
    for p in patterns or []:
        if p.startswith("layers:"):
            ids = [s.strip() for s in p[len("layers:") :].split(",") if s.strip()]
            _require(bool(ids) and all(s.isdigit() for s in ids), key, "'layers:<i>,<j>,...'", p)


@dataclass(kw_only=True)
class ModelConfig:
    """A decoder of one model family (megatron_ct/families): LLaMA-architecture GPT (RMSNorm,
    SwiGLU, RoPE, GQA) and its variants."""

    family: str | None = None
    """Model family (megatron_ct/families): 'llama' (LLaMA, SmolLM2, Mistral), 'qwen2' (QKV
    bias), 'qwen3' (q/k norm), or the mixtures of experts 'mixtral' and 'qwen3_moe'. The
    converter sets it from the HF config's ``architectures``;
    None detects it from ``add_qkv_bias`` / ``qk_layernorm`` (configs written before families),
    'llama' when neither is set."""
    num_layers: int = 4
    """Number of transformer blocks."""
    hidden_size: int = 128
    """Model width."""
    num_attention_heads: int = 4
    """Query heads."""
    num_query_groups: int | None = None
    """Key/value heads for grouped-query attention; None means one per query head (MHA)."""
    ffn_hidden_size: int | None = None
    """SwiGLU inner width; None means LLaMA's rule: 2/3 * 4h rounded up to a multiple of 256."""
    vocab_size: int = 512
    """True tokenizer vocabulary size. The embedding is padded beyond it (see
    ``make_vocab_size_divisible_by``); the true size is kept in checkpoints."""
    make_vocab_size_divisible_by: int = 128
    """The padded vocabulary is a multiple of this times the tensor-parallel size."""
    max_position_embeddings: int = 2048
    """Longest sequence the position encoding is set up for."""
    rotary_base: float = 10000.0
    """RoPE theta (HF ``rope_theta``)."""
    rope_scaling: dict | None = None
    """HF-style ``rope_scaling`` dict (``rope_type``: linear, dynamic, yarn, llama3); None: plain RoPE."""
    norm_epsilon: float = 1e-5
    """RMSNorm epsilon (HF ``rms_norm_eps``)."""
    untie_embeddings_and_output_weights: bool = True
    """LLaMA-2 has separate input and output embeddings; False ties them (e.g. small Qwen2)."""
    add_qkv_bias: bool | None = None
    """Bias on the QKV projection: the family's (Qwen2: true), filled in from ``family``; a value
    given must agree with it."""
    kv_channels: int | None = None
    """Width of each attention head (HF ``head_dim``); None: hidden_size / num_attention_heads.
    Qwen3 sets it apart from the hidden size (Qwen3-0.6B: 16 heads of 128 on a 1024 hidden)."""
    qk_layernorm: bool | None = None
    """RMSNorm on every query and key head before RoPE: the family's (Qwen3's ``q_norm`` /
    ``k_norm``), filled in from ``family``; a value given must agree with it."""
    init_method_std: float = 0.02
    """Std of the normal initialisation of a model built from scratch."""
    transformer_impl: str = "auto"
    """Linear layers and norms of the layer spec: 'transformer_engine', 'local' (megatron-core's
    own modules with megatron-ct's RMSNorm), or 'auto' (Transformer Engine when importable and
    on GPU, else local). The attention kernel is chosen separately by ``attention_backend``."""
    attention_backend: str = "auto"
    """Core attention (megatron_ct/model/attention.py): 'local' (megatron-core's
    DotProductAttention, materialises [b, heads, s, s] scores), 'sdpa' (PyTorch
    scaled_dot_product_attention: flash/cuDNN kernels), 'flex' (PyTorch FlexAttention, block
    mask from document segment ids: packed documents without a dense mask), 'te' (Transformer
    Engine; needs transformer_impl to resolve to transformer_engine; ignores document masks), or
    'auto': on GPU 'flex' when a stage masks documents (reset_attention_mask; 'sdpa' if
    torch.compile cannot build Triton kernels there), else 'te' with the TE layer spec, else
    'sdpa'; on CPU 'sdpa' (dense document mask). flex also runs on CPU (tests; it trains
    through SDPA there)."""
    attention_softmax_in_fp32: bool = True
    """Compute the attention softmax in FP32 (Ziya2: avoids bf16/fp16 overflow in CT). The fused
    sdpa/flex/te kernels always keep FP32 softmax statistics; only 'local' honours False."""
    num_experts: int | None = None
    """Routed experts in every layer's MLP (a mixture of experts: the ``mixtral`` and ``qwen3_moe``
    families, HF ``num_local_experts`` / ``num_experts``); None for the dense families. Each
    expert is a SwiGLU MLP of width ``moe_ffn_hidden_size``."""
    moe_ffn_hidden_size: int | None = None
    """Width of one expert's SwiGLU (HF ``moe_intermediate_size``; Mixtral's ``intermediate_size``);
    None: ``ffn_hidden_size``."""
    moe_router_topk: int = 2
    """Experts each token is routed to (HF ``num_experts_per_tok``)."""
    moe_norm_topk_prob: bool = True
    """Renormalise the top-k routing probabilities to sum to 1 (Mixtral always; Qwen3-MoE's
    ``norm_topk_prob``). Either way the probabilities are a softmax over all experts' logits; with
    renormalisation that is the softmax of the top-k logits (megatron-core's
    ``moe_router_pre_softmax=False``), without it the top-k of the full softmax (``True``)."""
    moe_aux_loss_coeff: float = 0.0
    """Weight of megatron-core's load-balancing loss (``aux_loss``: E / k * sum_i f_i P_i, added
    per MoE layer); 0 turns it off. The converter takes HF ``router_aux_loss_coef`` when
    ``output_router_logits`` is true (HF trains with it only then), else 0. HF's loss is k times
    megatron-core's per-layer loss, computed once over all layers' tokens."""
    moe_z_loss_coeff: float = 0.0
    """Weight of megatron-core's router z-loss (ST-MoE: the mean squared log-sum-exp of the router
    logits, per MoE layer; keeps the logits small); 0 turns it off. Neither HF family has one."""
    moe_expert_capacity_factor: float | None = None
    """Token slots an expert takes per micro-batch, as a multiple of an even share (``ceil(T * k /
    E * factor)`` of the ``T`` tokens a rank routes: under sequence or context parallelism its
    share of the sequence); the slots past it are dropped (those of lowest probability) and
    counted in the metrics (``moe_dropped_tokens``). megatron-core applies it in every forward,
    evaluation included. None: no limit, no token is dropped (HF's routing)."""
    loss_chunk_size: int | None = None
    """Compute the output layer and the cross-entropy this many sequence positions at a time
    (megatron_ct/model/chunked_loss.py), so the [s, b, V/tp] logits are never held at once (a
    150k vocabulary at 8k tokens is ~4.9 GB of FP32 logits per micro-batch); the backward
    recomputes the logits in as many vocabulary slices (one extra output-layer GEMM). Same loss
    and gradients as the plain path. None: megatron-core's output layer and cross-entropy."""

    def __post_init__(self) -> None:
        self._resolve_family()
        for key in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "max_position_embeddings"):
            _require(getattr(self, key) > 0, f"model.{key}", "a positive integer", getattr(self, key))
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        _require(
            self.num_attention_heads % self.num_query_groups == 0,
            "model.num_query_groups",
            f"a divisor of num_attention_heads={self.num_attention_heads}",
            self.num_query_groups,
        )
        if self.kv_channels is None:
            _require(
                self.hidden_size % self.num_attention_heads == 0,
                "model.hidden_size",
                f"a multiple of num_attention_heads={self.num_attention_heads} (or set model.kv_channels)",
                self.hidden_size,
            )
        else:
            _require(self.kv_channels > 0, "model.kv_channels", "a positive integer or null", self.kv_channels)
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 256 * ((int(8 * self.hidden_size / 3) + 255) // 256)
        _one_of(self.transformer_impl, "model.transformer_impl", ("auto", "local", "transformer_engine"))
        _number(self.rotary_base, "model.rotary_base", "a number > 0", self.rotary_base > 0)
        _number(self.norm_epsilon, "model.norm_epsilon", "a number > 0", self.norm_epsilon > 0)
        _number(self.init_method_std, "model.init_method_std", "a number > 0", self.init_method_std > 0)
        if self.rope_scaling is not None:
            from megatron_ct.config.rope import RopeScaling

            _require(isinstance(self.rope_scaling, dict), "model.rope_scaling", "a mapping or null", self.rope_scaling)
            try:
                RopeScaling.from_hf_dict(self.rope_scaling)
            except (TypeError, ValueError) as e:
                message = f"model.{e}" if str(e).startswith("rope_scaling") else f"model.rope_scaling: {e}"
                raise ConfigError(message) from None
        _one_of(self.attention_backend, "model.attention_backend", ("auto", "te", "sdpa", "flex", "local"))
        _require(
            self.attention_backend != "te" or self.transformer_impl != "local",
            "model.attention_backend",
            "not 'te' with model.transformer_impl=local (TE attention comes with the TE layer spec)",
            self.attention_backend,
        )
        self._check_experts()
        if self.loss_chunk_size is not None:
            _require(
                isinstance(self.loss_chunk_size, int)
                and not isinstance(self.loss_chunk_size, bool)
                and self.loss_chunk_size >= 1,
                "model.loss_chunk_size",
                "a positive integer (sequence positions per chunk) or null",
                self.loss_chunk_size,
            )

    def _resolve_family(self) -> None:
        """``family`` named or detected; the layer features it implies filled in (one source)."""
        from megatron_ct.families import detect_family, get_family

        if self.family is None:
            family = detect_family(bool(self.add_qkv_bias), bool(self.qk_layernorm))
        else:
            family = get_family(self.family)
        for key, value in (("add_qkv_bias", family.qkv_bias), ("qk_layernorm", family.qk_norm)):
            given = getattr(self, key)
            _require(given in (None, value), f"model.{key}", f"{value} (model.family={family.name})", given)
            setattr(self, key, value)
        self.family = family.name

    def _check_experts(self) -> None:
        """MoE settings: present exactly for the families with experts (``ModelFamily.moe``)."""
        from megatron_ct.families import get_family

        family = get_family(self.family)
        if not family.moe:
            _require(
                self.num_experts is None,
                "model.num_experts",
                f"null (model.family={family.name} is dense)",
                self.num_experts,
            )
            return
        e = self.num_experts
        ok = isinstance(e, int) and not isinstance(e, bool) and e >= 1
        _require(ok, "model.num_experts", f"a positive integer (model.family={family.name} has experts)", e)
        if self.moe_ffn_hidden_size is None:
            self.moe_ffn_hidden_size = self.ffn_hidden_size
        _require(
            self.moe_ffn_hidden_size > 0,
            "model.moe_ffn_hidden_size",
            "a positive integer or null",
            self.moe_ffn_hidden_size,
        )
        k = self.moe_router_topk
        _require(isinstance(k, int) and 1 <= k <= e, "model.moe_router_topk", f"an integer in [1, num_experts={e}]", k)
        # The one chosen expert's renormalised weight is always 1: the router would learn nothing
        # from the loss, and megatron-core refuses to build such a layer (a ValueError).
        _require(
            k > 1 or not self.moe_norm_topk_prob,
            "model.moe_router_topk",
            "at least 2 with model.moe_norm_topk_prob=true (top-1 weights renormalised to 1 give the router "
            "no gradient)",
            k,
        )
        for key, value in family.fixed:
            _require(
                getattr(self, key) == value, f"model.{key}", f"{value} (model.family={family.name})", getattr(self, key)
            )
        for key in ("moe_aux_loss_coeff", "moe_z_loss_coeff"):
            c = getattr(self, key)
            _number(c, f"model.{key}", "a number >= 0", isinstance(c, (int, float)) and c >= 0)
        f = self.moe_expert_capacity_factor
        if f is not None:
            _number(f, "model.moe_expert_capacity_factor", "a number > 0 or null (no limit)", f > 0)

    @property
    def head_dim(self) -> int:
        """Width of one attention head: ``kv_channels``, else hidden_size / num_attention_heads."""
        return self.kv_channels or self.hidden_size // self.num_attention_heads


@dataclass(kw_only=True)
class ParallelConfig:
    """How the model and the batch are split across ranks."""

    tensor_model_parallel_size: int = 1
    """TP: each layer's weights split across this many ranks."""
    pipeline_model_parallel_size: int = 1
    """PP: layers split into this many stages (1F1B schedule)."""
    virtual_pipeline_model_parallel_size: int | None = None
    """Interleaved 1F1B: model chunks per pipeline rank (needs PP > 1)."""
    context_parallel_size: int = 1
    """CP: each sequence split across this many ranks (not implemented by megatron-ct's attention
    backends yet: 1)."""
    expert_model_parallel_size: int = 1
    """EP: the experts of MoE layers split across this many ranks (1 for dense model families)."""
    sequence_parallel: bool = False
    """Split norms/dropout activations along the sequence across TP ranks (needs TP > 1)."""
    use_distributed_optimizer: bool = False
    """ZeRO-1: shard optimizer state and master weights across data-parallel ranks."""
    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduction with the backward pass."""
    device: str = "auto"
    """'cuda', 'cpu' (gloo plus megatron-ct's CPU device layer), or 'auto' (CUDA when visible)."""
    distributed_timeout_minutes: int = 10
    """Collective timeout while training: a collective that waits longer fails on every rank of
    every process group (the default one and megatron-core's). The hang watchdog
    (``train.hang_timeout_s``) usually ends a stuck step sooner, with stacks."""
    distributed_init_timeout_minutes: int | None = None
    """Collective timeout during start-up, until the first training step: rendezvous, rank 0
    building data indices while the others wait, checkpoint loading. None: the training one."""

    def __post_init__(self) -> None:
        for key in (
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
            "context_parallel_size",
            "expert_model_parallel_size",
        ):
            _require(getattr(self, key) >= 1, f"parallel.{key}", "an integer >= 1", getattr(self, key))
        for key in ("distributed_timeout_minutes", "distributed_init_timeout_minutes"):
            value = getattr(self, key)
            if value is not None or key == "distributed_timeout_minutes":
                _require(
                    isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                    f"parallel.{key}",
                    "an integer >= 1 (minutes)" + (" or null" if key != "distributed_timeout_minutes" else ""),
                    value,
                )
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None:
            _require(vpp >= 1, "parallel.virtual_pipeline_model_parallel_size", "an integer >= 1 or null", vpp)
            _require(
                vpp == 1 or self.pipeline_model_parallel_size > 1,
                "parallel.virtual_pipeline_model_parallel_size",
                "null when pipeline_model_parallel_size is 1",
                vpp,
            )
            if vpp == 1:
                self.virtual_pipeline_model_parallel_size = None
        _one_of(self.device, "parallel.device", ("auto", "cuda", "cpu"))


@dataclass(kw_only=True)
class TrainConfig:
    """Batch sizes, length of the run, precision and failure policy."""

    micro_batch_size: int = 2
    """Sequences per micro-batch per data-parallel rank."""
    global_batch_size: int = 8
    """Sequences per optimizer step, all ranks and micro-batches together."""
    train_iters: int = 40
    """Optimizer steps of the run (the iteration count at which it ends)."""
    seed: int = 1234
    """Seeds weights, data order and dropout. The batch at step k is a function of (seed, k)."""
    precision: str = "bf16"
    """'bf16', 'fp16' (dynamic loss scaling) or 'fp32'. Master weights are always FP32."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    nan_policy: str = "skip"
    """On a NaN/Inf loss or grad norm: 'skip' the update and go on, or 'stop' the run."""
    max_skipped_steps: int = 10
    """With nan_policy=skip, stop after this many consecutive skipped steps."""
    hang_detection: bool = True
    """A per-rank watchdog ends a step that does not finish within the hang timeout: Python
    stacks to ``hang/`` in checkpoint.save (else the log directory), exit code 4 (the sbatch
    script requeues; megatron_ct/training/watchdog.py)."""
    hang_timeout_s: float | None = None
    """Seconds a training step may take before it is a hang; None: learned (10x the slowest
    step after the first 3, at least 300 s)."""
    eval_hang_timeout_s: float | None = None
    """Seconds an evaluation (validation sets and downstream tasks, the base line included) may
    take before it is a hang, handled as a step's; None: learned (10x the slowest evaluation so
    far, at least 1800 s)."""
    save_hang_timeout_s: float | None = None
    """Seconds a checkpoint save may take before it is a hang, handled as a step's; None: learned
    (10x the slowest save so far, at least 1800 s)."""
    exit_interval: int | None = None
    """Stop (after saving) when the iteration is a multiple of this; for tests and job chunks."""
    recompute_granularity: str | None = None
    """Activation recomputation (megatron-core): 'selective' (attention core only, cheap) or
    'full' (whole layers, for long sequences); None keeps all activations."""
    trainable_params: list[str] | None = None
    """Train only these parameters (glob patterns over TP1/PP1/EP1 names, or the aliases
    'embeddings', 'layers:<i>,<j>', 'new_blocks', and for a mixture of experts 'experts' and
    'router'; see megatron_ct/training/freeze.py). The rest stay bit-identical. None trains
    everything."""
    lr_mult: dict[str, float] | None = None
    """Learning-rate multiplier per parameter class, on top of the schedule: ``embedding``
    (input embedding), ``output`` (output layer), ``new_vocab_rows`` (the rows a vocabulary
    expansion appended, in both; default: their matrix's), ``new_blocks`` (LLaMA-Pro blocks;
    default: body's), ``experts`` and ``router`` (a mixture of experts' expert weights and
    routers; default: body's), ``body`` (everything else). E.g. ``{body: 0.1}`` trains the
    body at a tenth of the LR and embeddings and output at the full LR; ``{experts: 0}`` keeps
    the experts bit-identical. Per stage: data.stages[].lr_mult."""

    def __post_init__(self) -> None:
        for key in ("micro_batch_size", "global_batch_size"):
            _require(getattr(self, key) >= 1, f"train.{key}", "an integer >= 1", getattr(self, key))
        _require(self.train_iters >= 0, "train.train_iters", "an integer >= 0", self.train_iters)
        _one_of(self.precision, "train.precision", ("bf16", "fp16", "fp32"))
        _one_of(self.nan_policy, "train.nan_policy", ("skip", "stop"))
        _one_of(self.recompute_granularity, "train.recompute_granularity", (None, "selective", "full"))
        _number(self.clip_grad, "train.clip_grad", "a finite number >= 0", self.clip_grad >= 0)
        _require(self.max_skipped_steps >= 0, "train.max_skipped_steps", "an integer >= 0", self.max_skipped_steps)
        for key in ("hang_timeout_s", "eval_hang_timeout_s", "save_hang_timeout_s"):
            value = getattr(self, key)
            _require(
                value is None or (_is_number(value) and value > 0),
                f"train.{key}",
                "seconds > 0 or null (learned)",
                value,
            )
        if self.exit_interval is not None:
            _require(self.exit_interval >= 1, "train.exit_interval", "an integer >= 1 or null", self.exit_interval)
        check_param_patterns(self.trainable_params, "train.trainable_params")
        check_lr_mult(self.lr_mult, "train.lr_mult")


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW and the learning-rate schedule (megatron-core's OptimizerParamScheduler)."""

    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 1e-4
    """Learning rate at the end of decay."""
    lr_warmup_iters: int = 0
    """Linear warmup steps from lr_warmup_init to lr. 0: no warmup (common in CT)."""
    lr_warmup_init: float = 0.0
    """Learning rate at the start of warmup. Re-warming a base model: warmup from here again."""
    lr_decay_style: str = "cosine"
    """'constant', 'linear', 'cosine', or 'WSD' (warmup-stable-decay)."""
    lr_decay_iters: int | None = None
    """Steps over which to decay; None: train_iters."""
    lr_wsd_decay_iters: int | None = None
    """WSD: length of the final decay phase; None: 10% of lr_decay_iters."""
    lr_wsd_decay_style: str = "linear"
    """WSD decay shape: 'linear', 'cosine', 'exponential' or 'minus_sqrt'."""
    weight_decay: float = 0.1
    """Decoupled weight decay (not applied to norms and biases)."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.95
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    initial_loss_scale: float = 2.0**16
    """fp16 only: starting dynamic loss scale."""
    decoupled_lr: float | None = None
    """Megatron-LM's ``--decoupled-lr``: peak LR of the input embedding and output layer
    (a multiplier decoupled_lr / lr for those classes, unless train.lr_mult sets them)."""

    def __post_init__(self) -> None:
        _number(self.lr, "optim.lr", "a finite number > 0", self.lr > 0)
        _number(self.min_lr, "optim.min_lr", f"a number in [0, lr={self.lr}]", 0 <= self.min_lr <= self.lr)
        _require(self.lr_warmup_iters >= 0, "optim.lr_warmup_iters", "an integer >= 0", self.lr_warmup_iters)
        _number(
            self.lr_warmup_init,
            "optim.lr_warmup_init",
            f"a number in [0, lr={self.lr}]",
            0 <= self.lr_warmup_init <= self.lr,
        )
        _number(self.weight_decay, "optim.weight_decay", "a finite number >= 0", self.weight_decay >= 0)
        for key in ("adam_beta1", "adam_beta2"):
            value = getattr(self, key)
            _number(value, f"optim.{key}", "a number in [0, 1)", 0 <= value < 1)
        _number(self.adam_eps, "optim.adam_eps", "a finite number > 0", self.adam_eps > 0)
        _number(self.initial_loss_scale, "optim.initial_loss_scale", "a finite number > 0", self.initial_loss_scale > 0)
        if self.lr_decay_iters is not None:
            _require(self.lr_decay_iters >= 1, "optim.lr_decay_iters", "an integer >= 1 or null", self.lr_decay_iters)
        if self.decoupled_lr is not None:
            _number(self.decoupled_lr, "optim.decoupled_lr", "a finite number >= 0 or null", self.decoupled_lr >= 0)
        _one_of(self.lr_decay_style, "optim.lr_decay_style", ("constant", "linear", "cosine", "WSD"))
        _one_of(self.lr_wsd_decay_style, "optim.lr_wsd_decay_style", ("linear", "cosine", "exponential", "minus_sqrt"))


PACKING_MODES = ("concat", "by_source")


def _check_keys(raw: dict, cls: type, key: str) -> None:
    """Unknown keys inside a nested data entry are errors naming the entry."""
    import dataclasses

    names = [f.name for f in dataclasses.fields(cls)]
    for name in raw:
        _require(name in names, f"{key}.{name}", "one of " + ", ".join(names) + " (unknown key)", raw[name])


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(kw_only=True)
class DatasetConfig:
    """A named corpus: one or more megatron-core IndexedDataset prefixes read as one stream.

    In YAML a dataset is a prefix string, ``{prefix: p}`` or ``{prefixes: [p1, p2]}``,
    optionally with ``doc_range`` and ``tag``.
    """

    prefixes: list[str]
    """Path prefixes of ``.bin``/``.idx`` pairs (tools/preprocess_data.py outputs), read in
    this order; relative ones are resolved against ``data.data_root``. A glob
    (``data/web-*_text_document``: the shards of an array job) stands for every prefix whose
    ``.idx`` it matches, in sorted order."""
    doc_range: list[float] = field(default_factory=lambda: [0.0, 1.0])
    """Fraction ``[start, end)`` of every prefix's documents to use; Megatron's ``--split``
    carves the train and valid parts of a file this way."""
    tag: str | None = None
    """Free-form source label (``zh``, ``code``, ...) for bookkeeping; not used by the engine."""
    upsample_long: dict[str, int] | None = None
    """Length-aware mixing for long-context CT (Fu et al. 2024: up-sample long documents within
    each source, keep the sources' shares): ``{min_tokens: N, factor: K}`` puts every document of
    at least N tokens K times (an integer >= 1) into each epoch of this training dataset. The
    blend's weights still set the source's share of sequences; within it, long documents weigh
    more. The length histogram before and after is logged at start-up. None: every document once."""

    @classmethod
    def parse(cls, raw: Any, key: str) -> DatasetConfig:
        if isinstance(raw, DatasetConfig):
            return raw
        if isinstance(raw, str):
            return cls(prefixes=[raw])
        _require(isinstance(raw, dict), key, "a prefix string or a mapping with prefix/prefixes", raw)
        raw = dict(raw)
        if "prefix" in raw:
            _require("prefixes" not in raw, key, "only one of prefix, prefixes", raw)
            raw["prefixes"] = [raw.pop("prefix")]
        _check_keys(raw, cls, key)
        prefixes = raw.get("prefixes")
        _require(
            isinstance(prefixes, list) and prefixes and all(isinstance(p, str) and p for p in prefixes),
            f"{key}.prefixes",
            "a non-empty list of path prefixes (or prefix: one path)",
            prefixes,
        )
        rng = raw.get("doc_range", [0.0, 1.0])
        _require(
            isinstance(rng, list) and len(rng) == 2 and all(_is_number(x) for x in rng) and 0 <= rng[0] < rng[1] <= 1,
            f"{key}.doc_range",
            "[start, end) fractions with 0 <= start < end <= 1",
            rng,
        )
        up = raw.get("upsample_long")
        if up is not None:
            _require(
                isinstance(up, dict) and set(up) == {"min_tokens", "factor"},
                f"{key}.upsample_long",
                "a mapping {min_tokens: N, factor: K}",
                up,
            )
            for name in ("min_tokens", "factor"):
                value = up[name]
                _require(
                    isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                    f"{key}.upsample_long.{name}",
                    "an integer >= 1",
                    value,
                )
            up = {"min_tokens": up["min_tokens"], "factor": up["factor"]}
        return cls(
            prefixes=list(prefixes), doc_range=[float(rng[0]), float(rng[1])], tag=raw.get("tag"), upsample_long=up
        )


@dataclass(kw_only=True)
class StageConfig:
    """One curriculum stage: a length, a blend (optionally ramped), a packing mode."""

    name: str
    """Stage name (logs, checkpoint data state, eval records)."""
    iters: int | None = None
    """Length in optimizer steps. Give iters or tokens; the last stage may give neither and
    runs to train.train_iters."""
    tokens: int | None = None
    """Length in training tokens, rounded up to whole steps of global_batch_size*seq_length (the
    stage's own sequence length)."""
    blend: dict[str, float]
    """Dataset name -> weight at the stage start: its share of the stage's sequences
    (normalised to sum 1)."""
    end_blend: dict[str, float] | None = None
    """Weights at the stage end; the blend ramps linearly from ``blend`` (None: no ramp)."""
    packing: str = "concat"
    """'concat': documents concatenated and cut into seq_length+1 windows; 'by_source': whole
    documents of one dataset per sequence, padded (padding masked out of the loss)."""
    reset_position_ids: bool = False
    """Position ids restart at 0 at every document start inside a sequence."""
    reset_attention_mask: bool = False
    """Block-diagonal causal attention: a token attends only to its own document."""
    eod_mask_loss: bool = False
    """No loss on the prediction made from a document's last token (EOD) of the next
    document's first token."""
    lr_rewarm_iters: int = 0
    """Re-warm the LR linearly from optim.lr_warmup_init to the schedule's value over this
    many steps from the stage start (0: no re-warm)."""
    trainable_params: list[str] | None = None
    """What learns during this stage (same patterns as train.trainable_params, e.g.
    ``[embeddings]`` or ``[new_vocab_rows]`` for a tune-embeddings-first stage); None: as
    train.trainable_params. Frozen parameters stay bit-identical through the stage."""
    lr_mult: dict[str, float] | None = None
    """LR multipliers per parameter class for this stage, over train.lr_mult (same classes)."""
    seq_length: int | None = None
    """Tokens per training sequence in this stage (a long-context stage: 4x the length); every
    dataset's stream continues at its position, cut into windows of this length. None: the
    stage before's (the first stage: data.seq_length). Validation keeps data.seq_length."""
    rotary_base: float | None = None
    """RoPE theta from this stage on (model.rotary_base, HF ``rope_theta``); None: the stage
    before's (the first stage: model.rotary_base)."""
    rope_scaling: dict | None = None
    """HF ``rope_scaling`` from this stage on (e.g. ``{rope_type: yarn, factor: 4,
    original_max_position_embeddings: 2048}``; ``{rope_type: default}`` turns a scaling off);
    None: the stage before's (the first stage: model.rope_scaling)."""
    max_position_embeddings: int | None = None
    """Longest sequence the position encoding is set up for from this stage on (YaRN's and
    llama3's reference length, the exported ``max_position_embeddings``); None: the stage
    before's (the first stage: model.max_position_embeddings)."""

    @classmethod
    def parse(cls, raw: Any, key: str) -> StageConfig:
        if isinstance(raw, StageConfig):
            return raw
        _require(isinstance(raw, dict), key, "a mapping with name, iters or tokens, blend", raw)
        _check_keys(raw, cls, key)
        raw = dict(raw)
        name_ = raw.get("name")
        _require(isinstance(name_, str) and bool(name_), f"{key}.name", "a non-empty string", name_)
        for name in ("iters", "tokens", "seq_length", "max_position_embeddings", "rotary_base"):
            _yaml_number(raw, name)
        for name in ("iters", "tokens"):
            value = raw.get(name)
            if isinstance(value, float) and value.is_integer():  # 1.0e9 tokens
                raw[name] = value = int(value)
            if value is not None:
                _require(
                    isinstance(value, int) and not isinstance(value, bool) and value > 0,
                    f"{key}.{name}",
                    "a positive integer or null",
                    value,
                )
        _require(
            raw.get("iters") is None or raw.get("tokens") is None,
            f"{key}.tokens",
            "null when iters is given",
            raw.get("tokens"),
        )
        for name in ("blend", "end_blend"):
            value = raw.get(name)
            if value is None and name == "end_blend":
                continue
            _require(
                isinstance(value, dict)
                and value
                and all(_is_number(w) and w >= 0 for w in value.values())
                and sum(value.values()) > 0,
                f"{key}.{name}",
                "a mapping dataset -> weight >= 0 with a positive sum",
                value,
            )
        _one_of(raw.get("packing", "concat"), f"{key}.packing", PACKING_MODES)
        for name in ("reset_position_ids", "reset_attention_mask", "eod_mask_loss"):
            _require(isinstance(raw.get(name, False), bool), f"{key}.{name}", "true or false", raw.get(name))
        rewarm = raw.get("lr_rewarm_iters", 0)
        _require(
            isinstance(rewarm, int) and not isinstance(rewarm, bool) and rewarm >= 0,
            f"{key}.lr_rewarm_iters",
            "an integer >= 0",
            rewarm,
        )
        trainable = raw.get("trainable_params")
        if isinstance(trainable, str):
            raw["trainable_params"] = trainable = [trainable]
        _require(
            trainable is None or (isinstance(trainable, list) and all(isinstance(t, str) for t in trainable)),
            f"{key}.trainable_params",
            "a list of parameter patterns or null",
            trainable,
        )
        check_param_patterns(trainable, f"{key}.trainable_params")
        check_lr_mult(raw.get("lr_mult"), f"{key}.lr_mult")
        _check_stage_position_keys(raw, key)
        return cls(**raw)


def _yaml_number(raw: dict, name: str) -> None:
    """``raw[name]`` as a number where it is a number's text: YAML 1.1 reads ``1.0e9`` and
    ``1e6`` (no exponent sign) as strings, as the loader does for top-level float fields."""
    value = raw.get(name)
    if isinstance(value, str):
        try:
            raw[name] = float(value)
        except ValueError:
            pass  # the type check names the key


def _check_stage_position_keys(raw: dict, key: str) -> None:
    """A stage's sequence length and RoPE keys, each on its own (their combination with the
    model's values is checked in CTConfig)."""
    for name, least in (("seq_length", 2), ("max_position_embeddings", 1)):
        value = raw.get(name)
        if isinstance(value, float) and value.is_integer():
            raw[name] = value = int(value)
        ok = value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= least)
        _require(ok, f"{key}.{name}", f"an integer >= {least} or null", value)
    base = raw.get("rotary_base")
    if base is not None:
        _number(base, f"{key}.rotary_base", "a number > 0 or null", _is_number(base) and base > 0)
    scaling = raw.get("rope_scaling")
    if scaling is not None:
        from megatron_ct.config.rope import RopeScaling

        _require(isinstance(scaling, dict), f"{key}.rope_scaling", "a mapping or null", scaling)
        try:
            RopeScaling.from_hf_dict(scaling)
        except (TypeError, ValueError) as e:
            message = f"{key}.{e}" if str(e).startswith("rope_scaling") else f"{key}.rope_scaling: {e}"
            raise ConfigError(message) from None


@dataclass(kw_only=True)
class DataConfig:
    """Where training sequences come from, and what is evaluated.

    Either the synthetic stream (default) or named indexed datasets mixed by a curriculum::

        datasets: {en: data/en_text_document, zh: {prefixes: [zh1, zh2]}}
        stages:
          - {name: warm, iters: 100, blend: {en: 0.7, zh: 0.3}, end_blend: {en: 0.5, zh: 0.5}}
          - {name: zh, tokens: 1.0e9, blend: {zh: 0.9, en: 0.1}, packing: by_source, lr_rewarm_iters: 10}
        valid: {general: en_valid, zh: data/zh_valid_text_document}

    Megatron-LM's ``--data-path w1 p1 w2 p2 --split 98,2,0`` is accepted as a one-stage
    curriculum (datasets named after the prefixes' file names, valid set ``valid``).
    """

    source: str | None = None
    """'synthetic' (a learnable token stream for smoke tests) or 'indexed' (datasets and
    stages); None: 'indexed' when stages or data_path are given, else 'synthetic'."""
    seq_length: int = 64
    """Tokens per training sequence (a stage may set its own: ``data.stages[i].seq_length``), and
    per validation sequence in every stage, so validation numbers compare across stages."""
    synthetic_branching: int = 4
    """Synthetic data: successors each token can have; the loss floor is about ln(this)."""
    datasets: dict[str, Any] = field(default_factory=dict)
    """Name -> dataset (prefix string or DatasetConfig mapping); stages and valid refer to names."""
    stages: list[Any] = field(default_factory=list)
    """The curriculum: StageConfig mappings, run in order."""
    valid: dict[str, Any] = field(default_factory=dict)
    """Validation set name -> dataset name, prefix or dataset mapping; each evaluated separately."""
    data_root: str | None = None
    """Directory relative dataset prefixes are resolved against (None: the working directory)."""
    data_path: list | None = None
    """Megatron-LM style ``[w1, p1, w2, p2, ...]`` (or one prefix): a one-stage curriculum."""
    split: str | None = None
    """With data_path: Megatron-LM's train,valid,test document split of every prefix, e.g.
    '98,2,0'; the valid part becomes the validation set 'valid' (the test part is not used)."""
    eval_interval: int | None = None
    """Evaluate every validation set every this many steps (and at every stage end)."""
    eval_iters: int = 2
    """Global batches of each validation set per evaluation (the same first documents each time)."""
    eval_baseline: bool | None = None
    """Evaluate every validation set before the first update (also with train_iters=0), so each
    has a base value that later evaluations are compared with; None: when the run starts from
    a base model (checkpoint.load with load_weights_only)."""
    downstream_tasks: list[str] = field(default_factory=list)
    """Downstream tasks scored in the loop on the training ranks (shipped task names or task YAML
    files, megatron_ct/evaluation/tasks.py): at iteration 0 with the base line, at every stage
    end, every downstream_interval steps and at the end, into downstream.jsonl. Needs
    data.tokenizer."""
    downstream_interval: int | None = None
    """Score the downstream tasks every this many steps too (None: base line, stage ends, end)."""
    max_regression: dict[str, float] = field(default_factory=dict)
    """Validation set or downstream task -> the largest relative regression from its base value
    that is tolerated: a rise of bits per byte (else loss) for a set, e.g. ``{en: 0.02}`` for
    English replay; a fall of accuracy for a task. See on_regression."""
    on_regression: str = "warn"
    """When a set regresses past max_regression: 'warn', or 'stop' (save and stop the run)."""
    tokenizer: str | None = None
    """Tokenizer of the data (SentencePiece .model or HF directory): needed for bits per byte
    (document bytes are measured by detokenizing) and checked against model.vocab_size."""
    index_cache_dir: str | None = None
    """Where per-dataset shuffle/packing indices are cached (None: ``ct_index_cache/`` next to
    each dataset's first prefix)."""
    log_samples: bool = False
    """Write every step's samples as [dataset, stream position, position after] to samples.jsonl in the
    log dir (rank 0): an audit of which data each step saw."""

    def __post_init__(self) -> None:
        _require(self.seq_length >= 2, "data.seq_length", "an integer >= 2", self.seq_length)
        _require(self.synthetic_branching >= 1, "data.synthetic_branching", "an integer >= 1", self.synthetic_branching)
        _require(self.eval_iters >= 1, "data.eval_iters", "an integer >= 1", self.eval_iters)
        _one_of(self.on_regression, "data.on_regression", ("warn", "stop"))
        for name, value in self.max_regression.items():
            _number(value, f"data.max_regression.{name}", "a finite number >= 0", _is_number(value) and value >= 0)
        if self.eval_interval is not None:
            _require(self.eval_interval >= 1, "data.eval_interval", "an integer >= 1 or null", self.eval_interval)
        if self.downstream_interval is not None:
            _require(
                self.downstream_interval >= 1,
                "data.downstream_interval",
                "an integer >= 1 or null",
                self.downstream_interval,
            )
        _require(
            isinstance(self.downstream_tasks, list) and all(isinstance(t, str) and t for t in self.downstream_tasks),
            "data.downstream_tasks",
            "a list of task names or task YAML paths",
            self.downstream_tasks,
        )
        if self.data_path is not None:
            self._from_megatron_data_path()
            # Kept in resolved form only, so a saved config reloads as the same curriculum.
            self.data_path = self.split = None
        elif self.split is not None:
            raise ConfigError(f"data.split: expected null unless data.data_path is given, got {self.split!r}")
        if self.source is None:
            self.source = "indexed" if self.stages else "synthetic"
        _one_of(self.source, "data.source", ("synthetic", "indexed"))
        if self.source == "synthetic":
            for key in ("stages", "valid", "datasets"):
                _require(not getattr(self, key), f"data.{key}", "empty when data.source is 'synthetic'", "...")
            return
        _require(bool(self.stages), "data.stages", "at least one stage when data.source is 'indexed'", self.stages)
        self.datasets = {name: DatasetConfig.parse(raw, f"data.datasets.{name}") for name, raw in self.datasets.items()}
        self.stages = [StageConfig.parse(raw, f"data.stages[{i}]") for i, raw in enumerate(self.stages)]
        names = [s.name for s in self.stages]
        for i, stage in enumerate(self.stages):
            key = f"data.stages[{i}]"
            _require(names.count(stage.name) == 1, f"{key}.name", "a name no other stage has", stage.name)
            for part in ("blend", "end_blend"):
                for ds in getattr(stage, part) or {}:
                    _require(
                        ds in self.datasets,
                        f"{key}.{part}.{ds}",
                        "a dataset named in data.datasets (" + ", ".join(sorted(self.datasets)) + ")",
                        ds,
                    )
            if stage.iters is None and stage.tokens is None:
                _require(
                    i == len(self.stages) - 1,
                    f"{key}.iters",
                    "a length (iters or tokens); only the last stage may run open-ended",
                    None,
                )
                _require(
                    stage.end_blend is None,
                    f"{key}.end_blend",
                    "null for an open-ended stage (a ramp needs a length)",
                    stage.end_blend,
                )
        for name, raw in list(self.valid.items()):
            if isinstance(raw, str) and raw in self.datasets:
                self.valid[name] = self.datasets[raw]
            else:
                self.valid[name] = DatasetConfig.parse(raw, f"data.valid.{name}")

    @property
    def uses_document_attention_mask(self) -> bool:
        """Some stage needs an explicit (block-diagonal) attention mask."""
        return self.source == "indexed" and any(s.reset_attention_mask for s in self.stages)

    def _from_megatron_data_path(self) -> None:
        """``--data-path w1 p1 w2 p2 --split 98,2,0`` -> datasets, one stage, valid set 'valid'."""
        import os

        key = "data.data_path"
        _require(
            not self.stages and not self.datasets, key, "null when data.stages/data.datasets are given", self.data_path
        )
        words = self.data_path
        if len(words) == 1:
            pairs = [(1.0, words[0])]
        else:
            _require(
                len(words) % 2 == 0 and all(_is_number(w) for w in words[0::2]),
                key,
                "weight/prefix pairs (w1 p1 w2 p2 ...) or a single prefix",
                words,
            )
            pairs = list(zip(words[0::2], words[1::2], strict=True))
        for _, prefix in pairs:
            _require(isinstance(prefix, str) and prefix, key, "path prefixes after each weight", prefix)
        train_range, valid_range = [0.0, 1.0], None
        if self.split is not None:
            try:
                parts = [float(x) for x in str(self.split).replace("/", ",").split(",")]
            except ValueError:
                parts = []
            _require(
                len(parts) in (1, 2, 3) and all(p >= 0 for p in parts) and sum(parts) > 0 and parts[0] > 0,
                "data.split",
                "train,valid,test weights such as '98,2,0'",
                self.split,
            )
            parts = [p / sum(parts) for p in parts] + [0.0] * (3 - len(parts))
            train_range = [0.0, parts[0]]
            if parts[1] > 0:
                valid_range = [parts[0], parts[0] + parts[1]]
        names: list[str] = []
        for i, (_, prefix) in enumerate(pairs):
            base = os.path.basename(prefix.rstrip("/")) or f"dataset{i}"
            names.append(base if base not in names else f"{base}_{i}")
        self.datasets = {n: {"prefixes": [p], "doc_range": train_range} for n, (_, p) in zip(names, pairs, strict=True)}
        blend = {n: float(w) for n, (w, _) in zip(names, pairs, strict=True)}
        self.stages = [{"name": "main", "blend": blend}]
        if valid_range is not None and not self.valid:
            self.valid = {"valid": {"prefixes": [p for _, p in pairs], "doc_range": valid_range}}


@dataclass(kw_only=True)
class CheckpointConfig:
    """Saving and loading megatron-core dist checkpoints."""

    save: str | None = None
    """Directory to save checkpoints into (iter_XXXXXXX/ plus a 'latest' file)."""
    save_interval: int | None = None
    """Save every this many steps (and always at the end when save is set)."""
    load: str | None = None
    """Checkpoint directory (or one iter_* directory) to resume from."""
    load_weights_only: bool = False
    """Start a CT run from a base model: take weights only; fresh optimizer, iteration 0,
    fresh LR schedule (re-warm with optim.lr_warmup_iters). Megatron-LM: --finetune."""
    save_on_sigterm: bool = True
    """On SIGTERM (SLURM preemption), save at the end of the current step and exit."""
    keep_last: int | None = None
    """Delete older iter_* directories, keeping this many (by iteration number; the tracked and
    the newest iteration are never deleted); None keeps all."""
    verify: bool = False
    """Write a SHA-256 of every checkpoint file at save and compare it at load (each rank hashes
    a share), catching a flipped bit in a shard. File sizes are always recorded and checked."""
    preflight: bool = True
    """When a run starts from a base (load_weights_only), rank 0 logs the pre-flight report's
    warnings before training: untrained-looking embedding/output rows, special ids that disagree
    between tokenizer, data and model (tools/preflight.py prints the full report, with id counts)."""

    def __post_init__(self) -> None:
        if self.save_interval is not None:
            _require(self.save_interval > 0, "checkpoint.save_interval", "an integer > 0 or null", self.save_interval)
        if self.keep_last is not None:
            _require(self.keep_last >= 1, "checkpoint.keep_last", "an integer >= 1 or null", self.keep_last)


@dataclass(kw_only=True)
class LoggingConfig:
    """What is reported and where."""

    log_interval: int = 1
    """Report every this many steps."""
    log_dir: str | None = None
    """Directory for metrics.jsonl (rank 0); None: the save directory, else no file."""
    tensorboard_dir: str | None = None
    """TensorBoard event directory; used when tensorboard is installed."""
    peak_tflops: float | None = None
    """Peak dense TFLOP/s per device for MFU; None: looked up from the GPU name (see
    megatron_ct.training.flops.PEAK_TFLOPS), or unknown."""
    straggler_threshold: float | None = 0.2
    """Warn (one line, naming the rank and host) when a rank's compute time per step is more than
    this fraction above the median of its pipeline stage's ranks, on log steps; per-rank times go
    to ranks.jsonl (megatron_ct/training/stragglers.py). None: no warning."""
    moe_dead_expert_intervals: int | None = 5
    """Mixtures of experts: warn (one line, naming the layer and the expert) when an expert has
    received no token in this many consecutive log intervals; once per expert until it receives
    tokens again (megatron_ct/training/router_health.py). None: no warning."""

    def __post_init__(self) -> None:
        _require(self.log_interval >= 1, "logging.log_interval", "an integer >= 1", self.log_interval)
        n = self.moe_dead_expert_intervals
        _require(
            n is None or (isinstance(n, int) and not isinstance(n, bool) and n >= 1),
            "logging.moe_dead_expert_intervals",
            "an integer >= 1 (log intervals) or null",
            n,
        )
        _require(
            self.straggler_threshold is None or (_is_number(self.straggler_threshold) and self.straggler_threshold > 0),
            "logging.straggler_threshold",
            "a fraction > 0 (0.2: 20% slower) or null",
            self.straggler_threshold,
        )


@dataclass(kw_only=True)
class CTConfig:
    """A whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The network."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """The parallel layout."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Batches, run length, precision."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and LR schedule."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics."""

    def __post_init__(self) -> None:
        _require(
            self.data.seq_length <= self.model.max_position_embeddings,
            "data.seq_length",
            f"at most model.max_position_embeddings={self.model.max_position_embeddings}",
            self.data.seq_length,
        )
        if self.data.uses_document_attention_mask and self.model.attention_backend == "te":
            i = next(i for i, s in enumerate(self.data.stages) if s.reset_attention_mask)
            raise ConfigError(
                f"data.stages[{i}].reset_attention_mask: needs model.attention_backend flex, sdpa or local (they "
                "apply document masks; Transformer Engine's causal attention ignores them), got te"
            )
        if self.data.source == "indexed":
            self._check_curriculum_covers_the_run()
            self._check_stage_lengths()
        for name in self.data.max_regression:
            _require(
                name in self.data.valid or bool(self.data.downstream_tasks),  # task names: checked at start-up
                f"data.max_regression.{name}",
                "a validation set named in data.valid ("
                + ", ".join(sorted(self.data.valid))
                + ") or a downstream task",
                name,
            )
        if not self.model.untie_embeddings_and_output_weights:
            self._check_tied_multipliers()
        if not self.model.num_experts:
            self._check_no_expert_classes()

    def _check_tied_multipliers(self) -> None:
        """Tied embeddings are one matrix: it cannot learn at two rates."""
        sources = [("train.lr_mult", self.train.lr_mult)]
        sources += [
            (f"data.stages[{i}].lr_mult", s.lr_mult)
            for i, s in enumerate(self.data.stages)
            if self.data.source == "indexed"
        ]
        run = self.train.lr_mult or {}
        for key, mult in sources:
            merged = {**run, **(mult or {})}
            if merged.get("embedding", 1.0) != merged.get("output", 1.0):
                raise ConfigError(
                    f"{key}: expected equal embedding and output multipliers for tied embeddings "
                    f"(model.untie_embeddings_and_output_weights=false), got {merged.get('embedding', 1.0)} and "
                    f"{merged.get('output', 1.0)}"
                )

    def _check_no_expert_classes(self) -> None:
        """A dense model has no experts or router to train or to give an LR."""
        stages = list(enumerate(self.data.stages)) if self.data.source == "indexed" else []
        sources = [("train", self.train.trainable_params, self.train.lr_mult)]
        sources += [(f"data.stages[{i}]", s.trainable_params, s.lr_mult) for i, s in stages]
        for where, trainable, mult in sources:
            for key, names in (("trainable_params", trainable or []), ("lr_mult", mult or {})):
                found = next((c for c in MOE_CLASSES if c in names), None)
                if found:
                    at = f"{where}.{key}" + (f".{found}" if key == "lr_mult" else "")
                    raise ConfigError(
                        f"{at}: expected '{found}' only for a mixture of experts (model.num_experts), "
                        f"got it for model.family={self.model.family} without experts"
                    )

    def _check_stage_lengths(self) -> None:
        """Each stage's sequence length fits the position encoding it runs with."""
        from megatron_ct.config.schedule import stage_ropes, stage_seq_lengths

        stages = self.data.stages
        settings = zip(stages, stage_seq_lengths(self.data), stage_ropes(self), strict=True)
        for i, (s, seq, (_, _, max_pos)) in enumerate(settings):
            if seq <= max_pos:
                continue
            where = next(
                (
                    f"data.stages[{j}].max_position_embeddings"
                    for j in range(i, -1, -1)
                    if stages[j].max_position_embeddings
                ),
                "model.max_position_embeddings",
            )
            key = f"data.stages[{i}].seq_length" if s.seq_length is not None or i else "data.seq_length"
            raise ConfigError(
                f"{key}: expected at most {where}={max_pos} (set data.stages[{i}].max_position_embeddings "
                f"for a longer stage), got {seq}"
            )

    def _check_curriculum_covers_the_run(self) -> None:
        """The stages must last at least train.train_iters (token lengths need the global batch)."""
        from megatron_ct.config.schedule import stage_iters

        d = self.data
        lengths = stage_iters(d, self.train.global_batch_size)
        if None not in lengths and sum(lengths) < self.train.train_iters:
            stages = ", ".join(f"{s.name}={n}" for s, n in zip(d.stages, lengths, strict=True))
            raise ConfigError(
                f"train.train_iters: expected at most the curriculum's {sum(lengths)} steps (data.stages: {stages}; "
                f"leave the last stage's iters/tokens out to run it to the end), got {self.train.train_iters}"
            )
