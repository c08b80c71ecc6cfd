"""What trains in each curriculum stage: the freeze plan, the one owner of freezing.

``trainable_params`` (per stage in ``data.stages[]``, else the run-level ``train.
trainable_params``; the synthetic stream is one stage) is a list of glob patterns over
*global* parameter names, the names a TP1/PP1 model would use
(``decoder.layers.<global index>.mlp.linear_fc1.weight``), so a recipe means the same thing
at every layout. Aliases:

- ``embeddings``: input embedding and output layer;
- ``layers:3,7``: every parameter of global layers 3 and 7;
- ``new_blocks``: the layers a checkpoint's block expansion added (its ``new_block_layers``);
- ``new_vocab_rows``: only the rows of embedding and output layer that a vocabulary
  expansion appended (its ``vocab_expansion``); old rows get zero gradient and no weight
  decay, so Adam moves them by exactly 0.

:class:`FreezePlan` resolves the patterns once, when the model is built, into one
:class:`GroupPolicy` per parameter: its LR multiplier and whether weight decay applies, in
every stage. Parameters with the same policy form one optimizer param group; the LR
scheduler (:mod:`megatron_ct.training.scheduler`) gives each group ``multiplier x`` the
scheduled LR in the current stage, so a frozen group (multiplier 0) moves by exactly 0.
Rebuilding megatron-core's DDP and optimizer mid-run is not safe (the old wrapper's gradient
hooks stay on the parameters), so switching what trains is a change of LR, never of modules.

``requires_grad=False`` is kept only as an optimisation, for parameters frozen in every
stage whose whole stacked checkpoint tensor is frozen (e.g. every layer's ``linear_fc1``
while only embeddings ever train): no weight gradient, no gradient buffer, no optimizer
state. A stack of which some layers train (LLaMA-Pro's new blocks) stays in the optimizer at
LR 0: checkpoints store layers stacked (``[L, ...]``), and a stack whose optimizer state
covered only some layers could not be saved.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_ct.checkpoint.keys import VOCAB_MATRICES
from megatron_ct.config.schedule import Schedule, Stage
from megatron_ct.errors import ConfigError

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


def expand_patterns(patterns: list[str] | tuple[str, ...], new_block_layers: list[int] | None) -> list[str]:
    """Aliases -> glob patterns (syntax is checked where the config is built)."""
    out = []
    for p in patterns:
        if p in ("embeddings", "new_vocab_rows"):
            out.extend(VOCAB_MATRICES)
        elif p.startswith("layers:"):
            out.extend(f"decoder.layers.{int(s)}.*" for s in p[len("layers:") :].split(",") if s.strip())
        elif p == "new_blocks":
            out.extend(f"decoder.layers.{i}.*" for i in new_block_layers or [])
        else:
            out.append(p)
    return out


def _stack_template(name: str) -> str | None:
    m = _LAYER.match(name)
    return "decoder.layers.{}." + name[m.end() :] if m else None


@dataclass(frozen=True)
class GroupPolicy:
    """How the parameters of one optimizer param group train, stage by stage."""

    lr_mult: tuple[float, ...]
    """Per stage: the multiplier on the scheduled LR (0: frozen)."""
    decay: tuple[bool, ...]
    """Per stage: whether weight decay applies (off where frozen or where old vocabulary rows are held)."""

    @property
    def key(self) -> str:
        """The group's identity (same on every rank and across save/load)."""
        lr = ",".join(f"{m:g}" for m in self.lr_mult)
        return f"lr[{lr}] decay[{''.join('1' if d else '0' for d in self.decay)}]"


class _RowHold:
    """Zero the gradient of the old vocabulary rows while a ``new_vocab_rows`` stage runs."""

    def __init__(self) -> None:
        self.active = False

    def attach(self, param: torch.nn.Parameter, first_new_row: int) -> None:
        """This TP rank holds the contiguous rows ``[tp_rank * local, (tp_rank + 1) * local)``.
        The hook runs before megatron-core's DDP accumulates the gradient into its buffer."""
        from megatron.core import parallel_state

        local = param.shape[0]
        start = parallel_state.get_tensor_model_parallel_rank() * local
        held = max(0, min(local, first_new_row - start))
        if held == 0:
            return

        def hook(grad: torch.Tensor) -> torch.Tensor:
            if not self.active:
                return grad
            grad = grad.clone()
            grad[:held] = 0
            return grad

        param.register_hook(hook)


class FreezePlan:
    """Per-parameter policies for every stage of the schedule. Collective to build (checks
    that every pattern matches some parameter on some rank)."""

    def __init__(self, chunks: list[torch.nn.Module], schedule: Schedule, num_layers: int, provenance: dict) -> None:
        self.schedule = schedule
        params: dict[str, torch.nn.Parameter] = {}
        for chunk in chunks:
            params.update(global_named_parameters(chunk))
        stages = schedule.stages
        new_blocks = provenance.get("new_block_layers")
        globs = [expand_patterns(st.trainable_params, new_blocks) if st.trainable_params else None for st in stages]
        self._holds_rows = [bool(st.trainable_params and "new_vocab_rows" in st.trainable_params) for st in stages]
        self._check_patterns_match(params, stages, globs)

        def trains(name: str, i: int) -> bool:
            return globs[i] is None or any(fnmatch.fnmatchcase(name, g) for g in globs[i])

        self.policies: dict[str, GroupPolicy] = {}
        self._policy_of: dict[int, GroupPolicy] = {}  # id(param) -> policy
        self.total = sum(p.numel() for p in params.values())
        self._numel: dict[str, int] = {}  # policy key -> elements on this rank
        for name, param in params.items():
            flags = [trains(name, i) for i in range(len(stages))]
            if not any(flags):
                template = _stack_template(name)
                # Pure function of (patterns, num_layers): every rank decides the same per stack.
                stack_trains = template is not None and any(
                    trains(template.format(layer), i) for layer in range(num_layers) for i in range(len(stages))
                )
                if not stack_trains:
                    param.requires_grad_(False)
                    continue
            holds = [flags[i] and self._holds_rows[i] and name in VOCAB_MATRICES for i in range(len(stages))]
            policy = GroupPolicy(
                lr_mult=tuple(1.0 if f else 0.0 for f in flags),
                decay=tuple(f and not h for f, h in zip(flags, holds, strict=True)),
            )
            policy = self.policies.setdefault(policy.key, policy)  # one object per policy
            self._policy_of[id(param)] = policy
            self._numel[policy.key] = self._numel.get(policy.key, 0) + param.numel()
        self._rows = _RowHold()
        if any(self._holds_rows):
            old_rows = provenance["vocab_expansion"]["old_vocab_size"]  # checked at start-up
            for name in VOCAB_MATRICES:
                if name in params:  # tied or untied, on this rank's pipeline stages
                    self._rows.attach(params[name], old_rows)
        self.stage: Stage = stages[0]

    @staticmethod
    def _check_patterns_match(params: dict, stages: list[Stage], globs: list[list[str] | None]) -> None:
        """Every pattern of every stage matches something (on some rank: all-reduced)."""
        # A tied model (SmolLM2, Llama 3.2, Qwen3-0.6B) has no output_layer.weight; the aliases
        # still name its one vocabulary matrix.
        aliased = [
            bool(st.trainable_params and {"embeddings", "new_vocab_rows"} & set(st.trainable_params)) for st in stages
        ]
        flat = [(i, g) for i, gs in enumerate(globs) for g in gs or [] if not (aliased[i] and g == VOCAB_MATRICES[1])]
        if not flat:
            return
        hits = torch.tensor([any(fnmatch.fnmatchcase(n, g) for n in params) for _, g in flat], dtype=torch.int64)
        if dist.is_initialized():
            hits = hits.to(next(iter(params.values())).device)
            dist.all_reduce(hits)
        unmatched: dict[int, list[str]] = {}
        for (i, g), n in zip(flat, hits.tolist(), strict=True):
            if n == 0:
                unmatched.setdefault(i, []).append(g)
        if unmatched:  # the same verdict on every rank after the all-reduce
            i, missing = next(iter(unmatched.items()))
            raise ConfigError(
                f"{stages[i].trainable_key}: {missing} match no parameter (names look like {next(iter(params))})"
            )

    # --- what the optimizer and the scheduler read ------------------------------------------
    def param_overrides(self) -> dict:
        """One megatron-core param-group override per policy (merged with its standard ones)."""
        from megatron.core.optimizer import ParamKey, ParamPredicate
        from megatron.core.optimizer_param_scheduler import ParamGroupOverride

        out = {}
        for key, policy in self.policies.items():
            pred = ParamPredicate(name=f"ct_group {key}", fn=lambda p, pol=policy: self._policy_of.get(id(p)) is pol)
            out[ParamKey(predicate=pred)] = ParamGroupOverride(ct_group=key)
        return out

    def enter_stage(self, stage: Stage) -> None:
        """Make ``stage``'s policies current (the row hold switches with it)."""
        self.stage = stage
        self._rows.active = self._holds_rows[stage.index]

    def trainable_elements(self) -> int:
        """Elements of this rank's parameters that learn in the current stage."""
        i = self.stage.index
        return sum(n for key, n in self._numel.items() if self.policies[key].lr_mult[i] > 0)
