"""Train only part of the model: embeddings first (vocab expansion), new blocks (LLaMA-Pro).

``train.trainable_params`` is a list of glob patterns over *global* parameter names, the
names a TP1/PP1 model would use (``decoder.layers.<global index>.mlp.linear_fc1.weight``),
so a recipe means the same thing at every layout. Aliases:

- ``embeddings``: input embedding and output layer (``embedding.word_embeddings.weight``,
  ``output_layer.weight``);
- ``layers:3,7``: every parameter of global layers 3 and 7;
- ``new_blocks``: the layers a checkpoint's block expansion added (its ``new_block_layers``);
- ``new_vocab_rows``: only the rows of embedding and output layer that a vocabulary
  expansion appended (its ``vocab_expansion``); old rows get zero gradient and no weight
  decay, so Adam moves them by exactly 0.

Two ways to freeze, chosen per parameter before megatron-core's DDP and optimizer exist:

- ``requires_grad=False`` when the parameter's whole stacked checkpoint tensor is frozen
  (e.g. every layer's ``linear_fc1`` while only embeddings train): no weight gradient, no
  gradient buffer, no optimizer state;
- a param group with peak LR 0 and no weight decay (attribute ``ct_frozen``) when only some
  layers of a stack are frozen (LLaMA-Pro's new blocks): checkpoints store layers stacked
  (``[L, ...]``), and a stack whose optimizer state covered only some layers could not be
  saved. Adam then moves the weight by exactly 0.

Either way frozen weights stay bit-identical.
"""

from __future__ import annotations

import fnmatch
import re

import torch
import torch.distributed as dist

from megatron_ct.config import ConfigError

EMBEDDINGS = ("embedding.word_embeddings.weight", "output_layer.weight")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def global_named_parameters(chunk: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Parameters of one model chunk under TP1/PP1 names (global layer numbers)."""
    offsets = {}
    decoder = getattr(chunk, "decoder", None)
    if decoder is not None:
        for local, layer in enumerate(decoder.layers):
            offsets[local] = layer.layer_number - 1  # megatron-core numbers layers globally from 1
    out = {}
    for name, param in chunk.named_parameters():
        m = _LAYER.match(name)
        if m:
            name = f"decoder.layers.{offsets[int(m.group(1))]}." + name[m.end() :]
        out[name] = param
    return out


def expand_patterns(patterns: list[str], new_block_layers: list[int] | None) -> list[str]:
    out = []
    for p in patterns:
        if p in ("embeddings", "new_vocab_rows"):
            out.extend(EMBEDDINGS)
        elif p.startswith("layers:"):
            ids = [s for s in p[len("layers:") :].split(",") if s.strip()]
            if not ids or not all(s.strip().isdigit() for s in ids):
                raise ConfigError(f"train.trainable_params: expected 'layers:<i>,<j>,...', got {p!r}")
            out.extend(f"decoder.layers.{int(s)}.*" for s in ids)
        elif p == "new_blocks":
            if not new_block_layers:
                raise ConfigError(
                    "train.trainable_params: 'new_blocks' needs a checkpoint written by tools/expand_blocks.py "
                    "(its metadata lists the added layers); checkpoint.load has none"
                )
            out.extend(f"decoder.layers.{i}.*" for i in new_block_layers)
        else:
            out.append(p)
    return out


def _stack_template(name: str) -> str | None:
    m = _LAYER.match(name)
    return "decoder.layers.{}." + name[m.end() :] if m else None


def _train_rows_from(param: torch.nn.Parameter, first_new_row: int) -> None:
    """Zero the gradient of vocabulary rows below ``first_new_row`` (this TP rank holds the
    contiguous rows ``[tp_rank * local, (tp_rank + 1) * local)``). The hook runs before
    megatron-core's DDP accumulates the gradient into its buffer."""
    from megatron.core import parallel_state

    local = param.shape[0]
    start = parallel_state.get_tensor_model_parallel_rank() * local
    frozen = max(0, min(local, first_new_row - start))
    if frozen == 0:
        return
    param.ct_rows_from = first_new_row  # optimizer.py: no weight decay on it

    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[:frozen] = 0
        return grad

    param.register_hook(hook)


def apply_trainable_params(
    chunks: list[torch.nn.Module],
    patterns: list[str] | None,
    num_layers: int,
    provenance: dict | None = None,
) -> tuple[int, int]:
    """Freeze every parameter no pattern matches. Collective (checks that each pattern
    matches something on some rank). ``provenance``: the loaded checkpoint's record of added
    blocks / vocabulary. Returns (trainable, total) elements on this rank."""
    provenance = provenance or {}
    params = {}
    for chunk in chunks:
        params.update(global_named_parameters(chunk))
    total = sum(p.numel() for p in params.values())
    if not patterns:
        return total, total
    globs = expand_patterns(patterns, provenance.get("new_block_layers"))
    if "new_vocab_rows" in patterns:
        expansion = provenance.get("vocab_expansion")
        if not expansion:
            raise ConfigError(
                "train.trainable_params: 'new_vocab_rows' needs a checkpoint resized by tools/expand_vocab.py "
                "(its metadata records the old vocabulary size); checkpoint.load has none"
            )
        for name in EMBEDDINGS:
            if name in params:  # tied or untied, on this rank's stages
                _train_rows_from(params[name], expansion["old_vocab_size"])

    def matching(name: str) -> list[int]:
        return [i for i, g in enumerate(globs) if fnmatch.fnmatchcase(name, g)]

    hits = torch.zeros(len(globs), dtype=torch.int64)
    trainable = 0
    for name, param in params.items():
        matched = matching(name)
        for i in matched:
            hits[i] += 1
        if matched:
            trainable += param.numel()
            continue
        template = _stack_template(name)
        # Pure function of (patterns, num_layers): every rank decides the same per stack.
        stack_partly_trained = template is not None and any(
            matching(template.format(layer)) for layer in range(num_layers)
        )
        if stack_partly_trained:
            param.ct_frozen = True  # optimizer.py gives these peak LR 0
        else:
            param.requires_grad_(False)
    if dist.is_initialized():
        hits = hits.to(next(iter(params.values())).device)
        dist.all_reduce(hits)
    unmatched = [g for g, n in zip(globs, hits.tolist(), strict=True) if n == 0]
    if unmatched:  # the same verdict on every rank after the all-reduce
        example = next(iter(params))
        raise ConfigError(f"train.trainable_params: {unmatched} match no parameter (names look like {example})")
    return trainable, total
