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

    def hook(grad: torch.Tensor) -> torch.Tensor:
        if not getattr(param, "ct_rows_active", True):  # a stage that trains all rows
            return grad
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
                params[name].ct_rows_from = expansion["old_vocab_size"]  # optimizer.py: no weight decay

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
    # A tied model (SmolLM2, Llama 3.2, Qwen3-0.6B) has no output_layer.weight; the aliases
    # still name its one vocabulary matrix.
    optional = {EMBEDDINGS[1]} if {"embeddings", "new_vocab_rows"} & set(patterns) else set()
    unmatched = [g for g, n in zip(globs, hits.tolist(), strict=True) if n == 0 and g not in optional]
    if unmatched:  # the same verdict on every rank after the all-reduce
        example = next(iter(params))
        raise ConfigError(f"train.trainable_params: {unmatched} match no parameter (names look like {example})")
    return trainable, total


def stage_trainable_windows(cfg) -> list[tuple[int, int | None, list[str] | None]]:
    """(start step, end step, patterns) per curriculum stage when any stage sets its own
    trainable_params; [] otherwise (the run-level train.trainable_params applies)."""
    if cfg.data.source != "indexed" or not any(s.trainable_params for s in cfg.data.stages):
        return []
    from megatron_ct.data.schedule import Schedule

    schedule = Schedule(cfg.data, cfg.train.global_batch_size)
    return [
        (st.start_iter, st.end_iter, cfg.data.stages[st.index].trainable_params or cfg.train.trainable_params)
        for st in schedule.stages
    ]


class StageFreezer:
    """Per-curriculum-stage ``trainable_params`` (tune embeddings first, unfreeze later).

    Rebuilding megatron-core's DDP and optimizer mid-run is not safe (the old wrapper's
    gradient hooks stay on the parameters), so when stages differ in what trains, every
    parameter stays in DDP and the optimizer, and freezing is done by LR: parameters are
    grouped by their pattern of trainable/frozen across stages (one optimizer param group
    per pattern), and at each stage start a frozen group gets peak LR 0 and no weight decay.
    Adam then moves those weights by exactly 0; their gradients are still computed.
    ``new_vocab_rows`` stages also zero the gradient of the old vocabulary rows.
    """

    def __init__(
        self,
        chunks,
        windows: list[tuple[int, int | None, list[str] | None]],
        num_layers: int,
        provenance: dict | None = None,
    ) -> None:
        provenance = provenance or {}
        self.windows = windows
        params = {}
        for chunk in chunks:
            params.update(global_named_parameters(chunk))
        # A class is named by its trainable/frozen pattern over the stages ("10": trains in
        # stage 1 only): megatron-core matches param groups across ranks by these values, so
        # they must mean the same on every pipeline stage.
        classes: dict[str, tuple[bool, ...]] = {}
        self.row_windows = [bool(p and "new_vocab_rows" in p) for _, _, p in windows]
        for name, param in params.items():
            flags = []
            for _, _, patterns in windows:
                if not patterns:
                    flags.append(True)
                    continue
                globs = expand_patterns(patterns, provenance.get("new_block_layers"))
                flags.append(any(fnmatch.fnmatchcase(name, g) for g in globs))
            key = "".join("1" if f else "0" for f in flags)
            classes[key] = tuple(flags)
            param.ct_freeze_class = key
        self.classes = classes
        if any(self.row_windows):
            expansion = provenance.get("vocab_expansion")
            if not expansion:
                raise ConfigError(
                    "data.stages[].trainable_params: 'new_vocab_rows' needs a checkpoint resized by "
                    "tools/expand_vocab.py; checkpoint.load has none"
                )
            for name in EMBEDDINGS:
                if name in params:
                    _train_rows_from(params[name], expansion["old_vocab_size"])
                    params[name].ct_rows_active = False
        self._rows_params = [params[n] for n in EMBEDDINGS if n in params]
        self.current: int | None = None

    def overrides(self) -> dict:
        """One optimizer param group per freeze class (merged into megatron-core's groups)."""
        from megatron.core.optimizer import ParamKey, ParamPredicate
        from megatron.core.optimizer_param_scheduler import ParamGroupOverride

        out = {}
        # Every class of every stage pattern, also those absent on this rank, is harmless:
        # groups are aligned across ranks by value and may be empty here.
        for k in self.classes:
            pred = ParamPredicate(
                name=f"ct_freeze_class_{k}", fn=lambda p, k=k: getattr(p, "ct_freeze_class", None) == k
            )
            # megatron-core re-matches loaded param groups by (wd_mult, lr_mult, ...) only; its
            # scheduler never reads lr_mult, so lr_mult carries the class to keep groups apart.
            out[ParamKey(predicate=pred)] = ParamGroupOverride(ct_freeze_class=k, lr_mult=f"ct-freeze:{k}")
        return out

    def window_at(self, iteration: int) -> int:
        for i, (start, end, _) in enumerate(self.windows):
            if start <= iteration and (end is None or iteration < end):
                return i
        return len(self.windows) - 1

    def apply(self, optimizer, scheduler, iteration: int) -> bool:
        """Set the groups for the stage of step ``iteration``; True if anything changed."""
        w = self.window_at(iteration)
        if w == self.current:
            return False
        self.current = w
        for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
            for group in opt.param_groups:
                k = group.get("ct_freeze_class")
                if k is None:
                    continue
                # wd_mult identifies groups on load, so decay is switched by ct_no_decay
                # (optimizer.FrozenAwareScheduler); a frozen group's LR 0 already stops it.
                if self.classes[k][w]:
                    group.pop("max_lr", None)
                    group.pop("min_lr", None)
                    group["ct_no_decay"] = self.row_windows[w]  # old vocabulary rows must not decay
                else:
                    group["max_lr"], group["min_lr"], group["ct_no_decay"] = 0.0, 0.0, True
        for p in self._rows_params:
            p.ct_rows_active = self.row_windows[w]
        scheduler.step(0)  # recompute every group's LR now
        return True
