"""What a model family is, declared once; everything the rest of megatron-ct needs derives from it.

A :class:`ModelFamily` declares, as data:

- the Hugging Face side: the ``architectures`` it reads and writes (:class:`HFArchitecture`),
  how ``config.json`` keys map onto :class:`~megatron_ct.config.ModelConfig` fields
  (:class:`ConfigKey`) and which settings it requires (``hidden_act: silu``, no MLP bias);
- what megatron-core builds: the features of its layers (QKV bias, per-head q/k RMSNorm);
- its tensor table (:class:`Tensor`): each of our tensors (global, i.e. TP-unsharded, names and
  shapes as dist checkpoints store them), the HF tensors it is made of, how they combine
  (``copy``, ``qkv``: per query group, ``gate_up``: concatenated) and which model sizes tensor
  parallelism splits it by; a mixture of experts' expert tensors have one HF tensor per expert
  and an ``[E]`` axis on our side (``per_expert``).

Derived here, once for every family: every tensor's shape on either side, the parameter count,
training FLOPs per token, the tensor-parallel sizes a model can be split at, and the HF <-> ours
name maps the converters walk. Shapes are written with the symbols of :func:`dims`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from megatron_ct.checkpoint import keys

if TYPE_CHECKING:
    from megatron_ct.config import ModelConfig

# --- names ----------------------------------------------------------------------------------
# Our tensors are megatron-core GPTModel state-dict keys; transformer layers are stacked under
# one key with a leading [num_layers] axis (megatron_ct/checkpoint/keys.py).
LAYER_PREFIX = keys.LAYER_PREFIX
HF_LAYER = "model.layers.{i}."

REQUIRED = object()
"""``ConfigKey.default`` of a key ``config.json`` must give."""


@dataclass(frozen=True)
class ConfigKey:
    """One ``config.json`` key read into a ModelConfig field (and written back from it)."""

    field: str
    hf: str
    default: Any = REQUIRED
    rule: str = "same"
    """'same' (the value as it is), 'negated' (a boolean stored the other way round) or 'own' (the
    converter's own rule, megatron_ct/convert/hf_layout.py: head_dim, RoPE, num_key_value_heads,
    initializer_range, the router's aux loss)."""
    also: tuple[str, ...] = ()
    """Other spellings read when ``hf`` is absent (transformers 5 writes Qwen3-MoE's
    ``num_experts`` as ``num_local_experts``)."""


@dataclass(frozen=True)
class HFArchitecture:
    """One HF ``architectures`` entry a family reads and writes."""

    name: str
    model_type: str
    extra_config: tuple[tuple[str, Any], ...] = ()
    """Keys a freshly written ``config.json`` gets besides the ones the family maps."""


@dataclass(frozen=True)
class Tensor:
    """One of our tensors and the HF tensors it is made of."""

    ct: str
    """Our name: a suffix of ``decoder.layers.`` for a per-layer tensor, else the full key."""
    shape: tuple[str, ...]
    """Our (global) shape in :func:`dims` symbols, without the stacked layer axis."""
    hf: tuple[tuple[str, tuple[str, ...]], ...]
    """(HF name, HF shape) of each part; per-layer names are suffixes of ``model.layers.<i>.``."""
    kind: str = "copy"
    """How the HF parts combine: 'copy' (one part), 'qkv' (per query group: its query heads,
    its key head, its value head) or 'gate_up' (``cat([gate, up])``)."""
    role: str = "linear"
    """'linear' (a GEMM weight of a linear module: counts for FLOPs), 'router' (the MoE router's
    GEMM weight, a plain parameter: counts for FLOPs), 'bias', 'norm', 'embedding' or 'output'."""
    per_layer: bool = True
    tp_divides: tuple[str, ...] = ()
    """ModelConfig sizes tensor parallelism splits this tensor by (each must divide by TP)."""
    when: str | None = None
    """Present only when this holds: 'qkv_bias', 'qk_norm' (family features) or 'untied'."""
    ct_aliases: tuple[str, ...] = ()
    """Other spellings of our name accepted when reading (unfused layer specs)."""
    per_expert: bool = False
    """One per expert of a MoE layer: HF names hold ``{e}`` (the expert), our tensor stacks the
    experts after the layer axis (``[L, E, ...]``, megatron-core's SequentialMLP keys)."""

    @property
    def ct_key(self) -> str:
        return LAYER_PREFIX + self.ct if self.per_layer else self.ct

    def hf_names(self, layer: int | None = None, expert: int | None = None) -> tuple[str, ...]:
        prefix = HF_LAYER.format(i=layer) if self.per_layer else ""
        return tuple(prefix + (name.format(e=expert) if self.per_expert else name) for name, _ in self.hf)

    @property
    def vocab(self) -> bool:
        """Rows are the vocabulary (padded on our side, the true size on HF's)."""
        return self.role in ("embedding", "output")


def dims(m: ModelConfig, vocab: int) -> dict[str, int]:
    """The symbols shapes are written in, for one model (``vocab``: the rows of the vocabulary
    matrices on the side being described)."""
    h, d, f = m.hidden_size, m.head_dim, m.ffn_hidden_size
    nq, ng = m.num_attention_heads, m.num_query_groups
    fe = m.moe_ffn_hidden_size or 0  # one expert's width (MoE families)
    return {
        "h": h,
        "d": d,
        "f": f,
        "2f": 2 * f,
        "q": nq * d,
        "kv": ng * d,
        "qkv": (nq + 2 * ng) * d,
        "V": vocab,
        "E": m.num_experts or 0,
        "fe": fe,
        "2fe": 2 * fe,
    }


SHAPE_FIELDS = (
    "family",
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "ffn_hidden_size",
    "kv_channels",
    "untie_embeddings_and_output_weights",
    "add_qkv_bias",  # the family's features, recorded by checkpoints from before model.family
    "qk_layernorm",
    "num_experts",
    "moe_ffn_hidden_size",
)
"""ModelConfig fields that decide which tensors a model has and their shapes (what :func:`dims`
reads, the layer count, tying and the family): a checkpoint must agree on them."""


@dataclass(frozen=True)
class ModelFamily:
    """One model family: its HF architectures and config keys, its features, its tensor table."""

    name: str
    description: str
    architectures: tuple[HFArchitecture, ...]
    """The first is what a model of this family is exported as by default."""
    config_keys: tuple[ConfigKey, ...]
    hf_requires: tuple[tuple[str, Any, Any], ...]
    """(config.json key, value it must have, its default when absent)."""
    tensors_table: tuple[Tensor, ...]
    qkv_bias: bool = False
    """q/k/v projections carry a bias (Qwen2); o_proj and the MLP never do."""
    qk_norm: bool = False
    """Per-head RMSNorm of queries and keys before RoPE (Qwen3's q_norm / k_norm)."""
    moe: bool = False
    """Every layer's MLP is a mixture of experts (``model.num_experts`` routed SwiGLU experts)."""
    fixed: tuple[tuple[str, Any], ...] = ()
    """ModelConfig fields the family's HF config cannot express otherwise (Mixtral always
    renormalises its top-k probabilities): a value given must agree."""

    # --- the HF side ---------------------------------------------------------------------------
    @property
    def architecture_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.architectures)

    def architecture(self, name: str) -> HFArchitecture:
        return next(a for a in self.architectures if a.name == name)

    # --- the tensor table ----------------------------------------------------------------------
    def tensors(self, m: ModelConfig) -> list[Tensor]:
        """The model's tensors, in the order conversion walks them (per-layer ones for one layer)."""
        holds = {"qkv_bias": self.qkv_bias, "qk_norm": self.qk_norm, "untied": m.untie_embeddings_and_output_weights}
        return [t for t in self.tensors_table if t.when is None or holds[t.when]]

    def layer_tensors(self, m: ModelConfig) -> list[Tensor]:
        return [t for t in self.tensors(m) if t.per_layer]

    def global_tensors(self, m: ModelConfig) -> list[Tensor]:
        return [t for t in self.tensors(m) if not t.per_layer]

    def ct_shapes(self, m: ModelConfig, padded_vocab: int) -> dict[str, tuple[int, ...]]:
        """Every tensor of our checkpoint and its global shape (layers stacked: ``[L, ...]``;
        experts after them: ``[L, E, ...]``)."""
        sym = dims(m, padded_vocab)
        out = {}
        for t in self.tensors(m):
            shape = tuple(sym[s] for s in t.shape)
            shape = (m.num_experts, *shape) if t.per_expert else shape
            out[t.ct_key] = (m.num_layers, *shape) if t.per_layer else shape
        return out

    def hf_shapes(self, m: ModelConfig) -> dict[str, tuple[int, ...]]:
        """Every HF tensor and its shape; ``lm_head`` only when untied."""
        sym = dims(m, m.vocab_size)
        out = {}
        for t in self.tensors(m):
            for layer in range(m.num_layers) if t.per_layer else [None]:
                for expert in range(m.num_experts) if t.per_expert else [None]:
                    for name, (_, shape) in zip(t.hf_names(layer, expert), t.hf, strict=True):
                        out[name] = tuple(sym[s] for s in shape)
        return out

    def ct_aliases(self) -> dict[str, str]:
        """Other spellings of our per-layer keys (unfused norm names) -> the name we write."""
        return {LAYER_PREFIX + a: t.ct_key for t in self.tensors_table for a in t.ct_aliases}

    def linear_modules(self, m: ModelConfig, per_expert: bool = False) -> list[str]:
        """Per-layer linear modules holding a GEMM weight (megatron-core saves an ``_extra_state``
        each): the ones without experts, or (``per_expert``) the experts' (one per expert)."""
        return [
            t.ct.removesuffix(".weight")
            for t in self.layer_tensors(m)
            if t.role == "linear" and t.per_expert == per_expert
        ]

    # --- derived counts ------------------------------------------------------------------------
    def num_parameters(self, m: ModelConfig, vocab: int | None = None) -> int:
        """Parameters of the model with ``vocab`` rows in its vocabulary matrices (default: the
        true vocabulary, as Hugging Face counts; the built model has the padded one)."""
        total = 0
        for shape in self.ct_shapes(m, m.vocab_size if vocab is None else vocab).values():
            n = 1
            for s in shape:
                n *= s
            total += n
        return total

    def flops_per_token(self, m: ModelConfig, seq_length: int, padded_vocab: int) -> float:
        """Training FLOPs (forward + backward = 3x forward) per token, counting matmuls only: every
        GEMM weight of a layer (2 FLOPs per weight per token), the attention scores and weighted
        sum over the full sequence (no causal discount: Megatron-LM's convention, so MFU figures
        compare) and the logits (tied or not). A mixture of experts counts its router and the
        ``moe_router_topk`` experts a token passes (active, not total, parameters)."""
        sym = dims(m, padded_vocab)
        per_layer = 0
        for t in self.layer_tensors(m):
            if t.role in ("linear", "router"):
                n = m.moe_router_topk if t.per_expert else 1  # a token passes k experts
                for s in t.shape:
                    n *= sym[s]
                per_layer += 2 * n
        per_layer += 2 * 2 * seq_length * sym["q"]  # QK^T and attention x V
        forward = m.num_layers * per_layer + 2 * sym["h"] * padded_vocab
        return 3.0 * forward

    # --- parallel splits -----------------------------------------------------------------------
    def tp_sizes_of(self, m: ModelConfig) -> tuple[str, ...]:
        """The ModelConfig sizes tensor parallelism must divide, in table order."""
        out: list[str] = []
        for t in self.tensors(m):
            out += [k for k in t.tp_divides if k not in out]
        return tuple(out)

    def valid_tp_sizes(self, m: ModelConfig) -> list[int]:
        """Tensor-parallel sizes the model can be split at."""
        sizes = [getattr(m, k) for k in self.tp_sizes_of(m)]
        top = min(sizes) if sizes else 1
        return [t for t in range(1, top + 1) if all(s % t == 0 for s in sizes)]

    def tp_requirement(self, m: ModelConfig) -> str:
        """'a divisor of num_attention_heads=32, num_query_groups=8 and ffn_hidden_size=14336'."""
        parts = [f"{k}={getattr(m, k)}" for k in self.tp_sizes_of(m)]
        joined = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        return f"a divisor of {joined}"


# --- the pieces LLaMA-like decoders share ----------------------------------------------------------

DECODER_CONFIG_KEYS = (
    ConfigKey("num_layers", "num_hidden_layers"),
    ConfigKey("hidden_size", "hidden_size"),
    ConfigKey("num_attention_heads", "num_attention_heads"),
    ConfigKey("ffn_hidden_size", "intermediate_size"),
    ConfigKey("vocab_size", "vocab_size"),
    ConfigKey("max_position_embeddings", "max_position_embeddings"),
    ConfigKey("norm_epsilon", "rms_norm_eps", 1e-6),
    ConfigKey("untie_embeddings_and_output_weights", "tie_word_embeddings", False, "negated"),
    # The key/value heads default to the query heads; head_dim is recorded only where it
    # differs from hidden / heads; RoPE has two spellings (rope_theta + rope_scaling, or
    # transformers 5's rope_parameters).
    ConfigKey("num_query_groups", "num_key_value_heads", None, "own"),
    ConfigKey("kv_channels", "head_dim", None, "own"),
    ConfigKey("rotary_base", "rope_theta", 10000.0, "own"),
    ConfigKey("init_method_std", "initializer_range", 0.02, "own"),  # a base config's is kept
)

SWIGLU_NO_BIAS = (("hidden_act", "silu", "silu"), ("attention_bias", False, False), ("mlp_bias", False, False))

_ATTN, _MLP = "self_attention.", "mlp."
_HEADS_AND_GROUPS = ("num_attention_heads", "num_query_groups")

DECODER_TENSORS = (
    Tensor(keys.EMBEDDING, ("V", "h"), (("model.embed_tokens.weight", ("V", "h")),), role="embedding", per_layer=False),
    Tensor(
        _ATTN + "linear_qkv.layer_norm_weight",
        ("h",),
        (("input_layernorm.weight", ("h",)),),
        role="norm",
        ct_aliases=("input_layernorm.weight",),
    ),
    Tensor(
        _ATTN + "linear_qkv.weight",
        ("qkv", "h"),
        (
            ("self_attn.q_proj.weight", ("q", "h")),
            ("self_attn.k_proj.weight", ("kv", "h")),
            ("self_attn.v_proj.weight", ("kv", "h")),
        ),
        kind="qkv",
        tp_divides=_HEADS_AND_GROUPS,
    ),
    Tensor(
        _ATTN + "linear_qkv.bias",
        ("qkv",),
        (("self_attn.q_proj.bias", ("q",)), ("self_attn.k_proj.bias", ("kv",)), ("self_attn.v_proj.bias", ("kv",))),
        kind="qkv",
        role="bias",
        tp_divides=_HEADS_AND_GROUPS,
        when="qkv_bias",
    ),
    Tensor(_ATTN + "q_layernorm.weight", ("d",), (("self_attn.q_norm.weight", ("d",)),), role="norm", when="qk_norm"),
    Tensor(_ATTN + "k_layernorm.weight", ("d",), (("self_attn.k_norm.weight", ("d",)),), role="norm", when="qk_norm"),
    Tensor(
        _ATTN + "linear_proj.weight",
        ("h", "q"),
        (("self_attn.o_proj.weight", ("h", "q")),),
        tp_divides=("num_attention_heads",),
    ),
    Tensor(
        _MLP + "linear_fc1.layer_norm_weight",
        ("h",),
        (("post_attention_layernorm.weight", ("h",)),),
        role="norm",
        ct_aliases=("pre_mlp_layernorm.weight",),
    ),
    Tensor(
        _MLP + "linear_fc1.weight",
        ("2f", "h"),
        (("mlp.gate_proj.weight", ("f", "h")), ("mlp.up_proj.weight", ("f", "h"))),
        kind="gate_up",
        tp_divides=("ffn_hidden_size",),
    ),
    Tensor(
        _MLP + "linear_fc2.weight", ("h", "f"), (("mlp.down_proj.weight", ("h", "f")),), tp_divides=("ffn_hidden_size",)
    ),
    Tensor(keys.FINAL_NORM, ("h",), (("model.norm.weight", ("h",)),), role="norm", per_layer=False),
    Tensor(keys.OUTPUT, ("V", "h"), (("lm_head.weight", ("V", "h")),), role="output", per_layer=False, when="untied"),
)
"""A LLaMA-architecture decoder (RMSNorm, SwiGLU, RoPE, GQA): megatron-core's GPTModel keys.

- ``linear_qkv`` ``[(nq + 2 ng) d, h]`` is laid out per query group (its nq/ng query heads,
  its key head, its value head, d rows each); TP cuts it into whole groups. The QKV bias is
  laid out the same way.
- ``linear_fc1`` ``[2f, h]`` is ``cat([gate_proj, up_proj])``: SwiGLU on its two halves.
- The input and pre-MLP RMSNorm weights are stored as ``linear_qkv.layer_norm_weight`` and
  ``linear_fc1.layer_norm_weight`` by both layer specs (TE fuses them; the local spec maps its
  ``input_layernorm`` / ``pre_mlp_layernorm`` onto those keys); reading accepts either.
- The embedding and the untied output layer have padded-vocabulary rows on our side.
"""


def decoder_family(
    name: str, description: str, architectures: tuple[HFArchitecture, ...], **features: bool
) -> ModelFamily:
    """A LLaMA-architecture decoder family: the shared config keys, requirements and tensor table,
    plus its own architectures and layer ``features`` (``qkv_bias``, ``qk_norm``)."""
    return ModelFamily(
        name=name,
        description=description,
        architectures=architectures,
        config_keys=DECODER_CONFIG_KEYS,
        hf_requires=SWIGLU_NO_BIAS,
        tensors_table=DECODER_TENSORS,
        **features,
    )


# --- mixtures of experts ------------------------------------------------------------------------

MOE_CONFIG_KEYS = (
    ConfigKey("moe_router_topk", "num_experts_per_tok"),
    # HF trains with its load-balancing loss only when output_router_logits is set.
    ConfigKey("moe_aux_loss_coeff", "router_aux_loss_coef", 0.0, "own"),
)


def moe_tensors(block: str, router: str, expert: tuple[str, str, str]) -> tuple[Tensor, ...]:
    """The decoder's tensor table with every MLP a mixture of experts: HF ``<block>.<router>``
    (the router, ``[E, h]``) and ``<block>.experts.<e>.<gate|up|down>.weight`` per expert.

    - ``mlp.router.weight`` ``[E, h]`` is the same on every TP rank;
    - ``mlp.experts.experts.linear_fc1.weight`` ``[E, 2fe, h]`` is each expert's
      ``cat([gate, up])``, ``linear_fc2`` ``[E, h, fe]`` its down projection (megatron-core's
      SequentialMLP: experts stacked after the layer axis; expert tensor parallelism splits fe,
      expert parallelism the E axis);
    - the pre-MLP RMSNorm keeps the dense key, ``mlp.linear_fc1.layer_norm_weight``.
    """
    gate, up, down = (f"{block}.experts.{{e}}.{name}.weight" for name in expert)
    experts = "mlp.experts.experts."
    moe = (
        Tensor("mlp.router.weight", ("E", "h"), ((f"{block}.{router}.weight", ("E", "h")),), role="router"),
        Tensor(
            experts + "linear_fc1.weight",
            ("2fe", "h"),
            ((gate, ("fe", "h")), (up, ("fe", "h"))),
            kind="gate_up",
            tp_divides=("moe_ffn_hidden_size",),
            per_expert=True,
        ),
        Tensor(
            experts + "linear_fc2.weight",
            ("h", "fe"),
            ((down, ("h", "fe")),),
            tp_divides=("moe_ffn_hidden_size",),
            per_expert=True,
        ),
    )
    dense_mlp = (_MLP + "linear_fc1.weight", _MLP + "linear_fc2.weight")
    out: list[Tensor] = []
    for t in DECODER_TENSORS:
        if t.ct == dense_mlp[0]:
            out += moe
        elif t.ct != dense_mlp[1]:
            out.append(t)
    return tuple(out)


def moe_family(
    name: str,
    description: str,
    architectures: tuple[HFArchitecture, ...],
    config_keys: tuple[ConfigKey, ...],
    hf_requires: tuple[tuple[str, Any, Any], ...],
    tensors_table: tuple[Tensor, ...],
    **features: Any,
) -> ModelFamily:
    """A LLaMA-architecture decoder whose every MLP is a mixture of SwiGLU experts."""
    return ModelFamily(
        name=name,
        description=description,
        architectures=architectures,
        config_keys=config_keys + MOE_CONFIG_KEYS,
        hf_requires=SWIGLU_NO_BIAS + hf_requires,
        tensors_table=tensors_table,
        moe=True,
        **features,
    )
