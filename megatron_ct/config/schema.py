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

from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A bad configuration value. The message names the key and what was expected."""


def _require(cond: bool, key: str, expected: str, got: Any) -> None:
    if not cond:
        raise ConfigError(f"{key}: expected {expected}, got {got!r}")


def _one_of(value: Any, key: str, choices: tuple) -> None:
    _require(value in choices, key, "one of " + ", ".join(map(str, choices)), value)


@dataclass(kw_only=True)
class ModelConfig:
    """LLaMA-architecture GPT (RMSNorm, SwiGLU, RoPE, GQA, no biases)."""

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
    add_qkv_bias: bool = False
    """Bias on the QKV projection (Qwen2)."""
    init_method_std: float = 0.02
    """Std of the normal initialisation of a model built from scratch."""
    transformer_impl: str = "auto"
    """Layer spec: 'transformer_engine', 'local' (megatron-core's own modules), or 'auto'
    (Transformer Engine when importable and on GPU, else local)."""
    attention_softmax_in_fp32: bool = True
    """Compute the attention softmax in FP32 (Ziya2: avoids bf16/fp16 overflow in CT)."""

    def __post_init__(self) -> None:
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
        _require(
            self.hidden_size % self.num_attention_heads == 0,
            "model.hidden_size",
            f"a multiple of num_attention_heads={self.num_attention_heads}",
            self.hidden_size,
        )
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 256 * ((int(8 * self.hidden_size / 3) + 255) // 256)
        _one_of(self.transformer_impl, "model.transformer_impl", ("auto", "local", "transformer_engine"))


@dataclass(kw_only=True)
class ParallelConfig:
    """How the model and the batch are split across ranks."""

    tensor_model_parallel_size: int = 1
    """TP: each layer's weights split across this many ranks."""
    pipeline_model_parallel_size: int = 1
    """PP: layers split into this many stages (1F1B schedule)."""
    virtual_pipeline_model_parallel_size: int | None = None
    """Interleaved 1F1B: model chunks per pipeline rank (needs PP > 1)."""
    sequence_parallel: bool = False
    """Split norms/dropout activations along the sequence across TP ranks (needs TP > 1)."""
    use_distributed_optimizer: bool = False
    """ZeRO-1: shard optimizer state and master weights across data-parallel ranks."""
    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduction with the backward pass."""
    device: str = "auto"
    """'cuda', 'cpu' (gloo plus megatron-ct's CPU device layer), or 'auto' (CUDA when visible)."""
    distributed_timeout_minutes: int = 10
    """Collective timeout."""

    def __post_init__(self) -> None:
        for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
            _require(getattr(self, key) >= 1, f"parallel.{key}", "an integer >= 1", getattr(self, key))
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
    exit_interval: int | None = None
    """Stop (after saving) when the iteration is a multiple of this; for tests and job chunks."""
    trainable_params: list[str] | None = None
    """Train only these parameters (glob patterns over TP1/PP1 names, or the aliases
    'embeddings', 'layers:<i>,<j>', 'new_blocks'; see megatron_ct/training/freeze.py). The
    rest stay bit-identical. None trains everything."""

    def __post_init__(self) -> None:
        for key in ("micro_batch_size", "global_batch_size"):
            _require(getattr(self, key) >= 1, f"train.{key}", "an integer >= 1", getattr(self, key))
        _require(self.train_iters >= 0, "train.train_iters", "an integer >= 0", self.train_iters)
        _one_of(self.precision, "train.precision", ("bf16", "fp16", "fp32"))
        _one_of(self.nan_policy, "train.nan_policy", ("skip", "stop"))
        _require(self.clip_grad >= 0, "train.clip_grad", "a number >= 0", self.clip_grad)


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

    def __post_init__(self) -> None:
        _require(self.lr > 0, "optim.lr", "a number > 0", self.lr)
        _require(0 <= self.min_lr <= self.lr, "optim.min_lr", f"a number in [0, lr={self.lr}]", self.min_lr)
        _require(self.lr_warmup_iters >= 0, "optim.lr_warmup_iters", "an integer >= 0", self.lr_warmup_iters)
        _require(
            0 <= self.lr_warmup_init <= self.lr,
            "optim.lr_warmup_init",
            f"a number in [0, lr={self.lr}]",
            self.lr_warmup_init,
        )
        _one_of(self.lr_decay_style, "optim.lr_decay_style", ("constant", "linear", "cosine", "WSD"))
        _one_of(self.lr_wsd_decay_style, "optim.lr_wsd_decay_style", ("linear", "cosine", "exponential", "minus_sqrt"))


@dataclass(kw_only=True)
class DataConfig:
    """Where training sequences come from."""

    source: str = "synthetic"
    """'synthetic': a deterministic, learnable token stream (smoke tests and the default run)."""
    seq_length: int = 64
    """Tokens per training sequence."""
    synthetic_branching: int = 4
    """Synthetic data: successors each token can have; the loss floor is about ln(this)."""

    def __post_init__(self) -> None:
        _one_of(self.source, "data.source", ("synthetic",))
        _require(self.seq_length >= 2, "data.seq_length", "an integer >= 2", self.seq_length)
        _require(self.synthetic_branching >= 1, "data.synthetic_branching", "an integer >= 1", self.synthetic_branching)


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
    """Delete older iter_* directories, keeping this many; None keeps all."""

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

    def __post_init__(self) -> None:
        _require(self.log_interval >= 1, "logging.log_interval", "an integer >= 1", self.log_interval)


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
