"""Tiny random HF models for the conversion tests, and a launcher for torchrun scripts."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from real_configs import LLAMA_3_2_1B, MIXTRAL_8X7B_V0_1, QWEN3_0_6B, QWEN3_30B_A3B

from launch import REPO, run_torchrun  # noqa: F401  (re-exported for the convert tests)

HIDDEN, HEADS, FFN, LAYERS, MAX_POS = 64, 4, 128, 2, 128

# name: (model_type, config kwargs, weight files). Vocabulary 300 pads to 384 at TP1 and 512 at
# TP2, so loading a TP2-padded checkpoint at TP1 exercises the trainer's vocab resizing.
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
# Published config.json of current bases (tests/real_configs.py), scaled down below: the keys,
# RoPE settings, tying and head ratios stay, the sizes shrink to a few kB of weights.


def scaled(real: dict, heads: int, **sizes) -> dict:
    """``real`` with ``heads`` query heads (key/value heads and head_dim in the real ratios to
    them and to the hidden size) and the given sizes; everything else as released."""
    # initializer_range is left to hf_config's 0.1: logits of a 2-layer model initialised at 0.02
    # are too small to tell a wrong tensor apart.
    out = {k: v for k, v in real.items() if k not in ("architectures", "initializer_range")}
    ratio = real["num_attention_heads"] // real["num_key_value_heads"]
    hidden = sizes.get("hidden_size", HIDDEN)
    real_head_dim = real.get("head_dim", real["hidden_size"] // real["num_attention_heads"])
    head_dim = real_head_dim * hidden * real["num_attention_heads"] // (real["hidden_size"] * heads)
    out.update(num_attention_heads=heads, num_key_value_heads=heads // ratio, head_dim=head_dim, hidden_size=hidden)
    for key in ("intermediate_size", "moe_intermediate_size"):
        if key in real:
            out[key] = hidden * real[key] // real["hidden_size"]
    out.update(num_hidden_layers=LAYERS, max_position_embeddings=MAX_POS, **sizes)
    return out


CASES = {
    "llama_tied_gqa_llama3": (
        "llama",
        {
            "vocab_size": 300,
            "num_key_value_heads": 2,
            "tie_word_embeddings": True,
            "rms_norm_eps": 1e-6,
            "rope_theta": 500000.0,
            "rope_scaling": LLAMA3_ROPE,
        },
        "sharded_safetensors",
    ),
    "llama_untied_mha": (
        "llama",
        {
            "vocab_size": 300,
            "num_key_value_heads": 4,
            "tie_word_embeddings": False,
            "rope_scaling": {"rope_type": "linear", "factor": 2.0},
        },
        "safetensors",
    ),
    "mistral": (
        "mistral",
        {
            "vocab_size": 300,
            "num_key_value_heads": 2,
            "tie_word_embeddings": False,
            "sliding_window": None,
            "rope_theta": 1000000.0,
        },
        "safetensors",
    ),
    # Every other HF rope_scaling type (issue 6): YaRN with its attention factor, and
    # dynamic NTK, which only differs from plain RoPE past max_position_embeddings (32 < 48).
    "llama_yarn": (
        "llama",
        {
            "vocab_size": 300,
            "num_key_value_heads": 2,
            "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
        },
        "safetensors",
    ),
    "llama_dynamic_ntk": (
        "llama",
        {
            "vocab_size": 300,
            "num_key_value_heads": 2,
            "max_position_embeddings": 32,
            "rope_scaling": {"rope_type": "dynamic", "factor": 2.0},
        },
        "safetensors",
    ),
    "qwen2_bias_tied": (
        "qwen2",
        {
            "vocab_size": 300,
            "num_key_value_heads": 2,
            "tie_word_embeddings": True,
            "rope_theta": 1000000.0,
            "rms_norm_eps": 1e-6,
        },
        "bin",
    ),
    # Qwen3: per-head q/k RMSNorm, head_dim = 2 x hidden / heads (32 vs 16), no QKV bias.
    "qwen3_0_6b_shaped": ("qwen3", scaled(QWEN3_0_6B, 4, vocab_size=300), "safetensors"),
    # Llama 3.2: tied, 4 query heads per key/value head, llama3 RoPE whose scaling starts
    # inside the 48 test tokens (original context 16 instead of 8192).
    "llama3_2_1b_shaped": (
        "llama",
        scaled(
            LLAMA_3_2_1B,
            8,
            vocab_size=300,
            rope_scaling={**LLAMA_3_2_1B["rope_scaling"], "original_max_position_embeddings": 16},
        ),
        "safetensors",
    ),
    # Mixtures of experts (issue 27): fewer experts, the released top-k and routing rules.
    # Qwen3-30B-A3B: 8 query heads per key/value head (16 of 8 on a 64 hidden), q/k norm, 8 of
    # 128 experts renormalised -> 2 of 8; untied.
    "qwen3_30b_a3b_shaped": (
        "qwen3_moe",
        scaled(QWEN3_30B_A3B, 16, vocab_size=300, num_experts=8, num_experts_per_tok=2),
        "safetensors",
    ),
    # norm_topk_prob false (the transformers default): the top k of the full softmax, tied.
    "qwen3_moe_unnormalised_tied": (
        "qwen3_moe",
        scaled(
            QWEN3_30B_A3B,
            16,
            vocab_size=300,
            num_experts=6,
            num_experts_per_tok=3,
            norm_topk_prob=False,
            tie_word_embeddings=True,
        ),
        "sharded_safetensors",
    ),
    # Mixtral-8x7B: 4 query heads per key/value head, 2 of 8 experts -> 2 of 4.
    "mixtral_8x7b_shaped": (
        "mixtral",
        scaled(MIXTRAL_8X7B_V0_1, 8, vocab_size=300, num_local_experts=4),
        "safetensors",
    ),
}
MOE_CASES = [name for name, (model_type, _, _) in CASES.items() if model_type in ("mixtral", "qwen3_moe")]


def hf_config(model_type: str, **overrides):
    from transformers import AutoConfig

    kwargs = {
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "max_position_embeddings": MAX_POS,
        "initializer_range": 0.1,
        "attn_implementation": "eager",
        **overrides,
    }
    return AutoConfig.for_model(model_type, **kwargs)


def build_hf_model(model_type: str, kwargs: dict, out_dir: Path, files: str = "safetensors", seed: int = 0):
    """A random fp32 model saved at ``out_dir``. Norm weights and biases are randomised too
    (HF initialises them to ones / zeros), so a swapped or dropped tensor shows in the logits."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(model_type, **kwargs))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.eval()
    if files == "bin":
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(out_dir)
        torch.save(
            {
                k: v.contiguous()
                for k, v in model.state_dict().items()
                if not (k == "lm_head.weight" and model.config.tie_word_embeddings)
            },
            out_dir / "pytorch_model.bin",
        )
    else:
        model.save_pretrained(out_dir, max_shard_size="100KB" if files == "sharded_safetensors" else "5GB")
    return model


def build_tokenizer(out_dir: Path, vocab_size: int) -> None:
    """A word-level HF tokenizer ``w3 .. w{vocab-1}`` plus <unk>/<s>/</s>, saved at ``out_dir``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(
        out_dir
    )


def safetensors_dict(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF safetensors directory (tests only: loads them all)."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
