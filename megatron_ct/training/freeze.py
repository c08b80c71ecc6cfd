"""What trains in each curriculum stage, and how fast: the freeze plan, the one owner of both.

``trainable_params`` (per stage in ``data.stages[]``, else the run-level ``train.
trainable_params``; the synthetic stream is one stage) is a list of glob patterns over
*global* parameter names, the names a TP1/PP1 model would use
(``decoder.layers.<global index>.mlp.linear_fc1.weight``), so a recipe means the same thing
at every layout. Aliases:

- ``embeddings``: input embedding and output layer;
- ``layers:3,7``: every parameter of global layers 3 and 7;
- ``new_blocks``: the layers a checkpoint's block expansion added (its ``new_block_layers``);
- ``new_vocab_rows``: only the rows of embedding and output layer that a vocabulary
  expansion appended (its ``vocab_expansion``); old rows get zero gradient and their update
  is undone (:class:`RowScaling`), so they stay bit-identical;
- ``experts``, ``router``: a mixture of experts' expert weights (every layer's
  ``mlp.experts.local_experts.<e>.*``) and routers (``mlp.router.*``).

Experts are named by their global index too (``local_experts.<e>``, ``e`` in
``[0, num_experts)`` as at EP1), so a pattern means the same experts at every expert-parallel
size.

On top of what trains, ``lr_mult`` (``train.lr_mult``, per stage ``data.stages[].lr_mult``,
Megatron-LM's ``optim.decoupled_lr``) scales the LR per parameter class: ``embedding``,
``output``, ``new_vocab_rows`` (rows appended by a vocabulary expansion), ``new_blocks``
(LLaMA-Pro blocks), ``experts`` and ``router`` (a mixture of experts' expert weights and
routers) and ``body``. ``new_blocks``, ``experts`` and ``router`` default to ``body``'s
multiplier; a new block's experts are ``new_blocks`` (a new block learns as one).
Expert weights are megatron-core's expert-parallel parameters (their own gradient buffer and
optimizer, reduced over the expert-data-parallel group); the classes are assigned per
parameter before megatron-core splits them, so the split keeps them.

:class:`FreezePlan` resolves patterns and multipliers once, when the model is built, into one
:class:`GroupPolicy` per parameter: its LR multiplier in every stage (0: frozen). Parameters
with the same policy form one optimizer param group; the LR scheduler
(:mod:`megatron_ct.training.scheduler`) gives each group ``multiplier x`` the scheduled LR of
the current stage, so a frozen group moves by exactly 0 (weight decay is decoupled, scaled
by the LR, so it stops too). Rows of one vocabulary matrix cannot be split into groups: old
and appended rows learning at different rates (``new_vocab_rows``) are the matrix's group at
the larger multiplier and :class:`RowScaling`, a step hook on the optimizer, scales the other
rows' update by the ratio (ratio 0: restored bit for bit; their gradient is zeroed too, so
Adam's moments of held rows stay untouched, as if the rows were not trained).
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
from typing import Any

import torch
import torch.distributed as dist

from megatron_ct.checkpoint.keys import EMBEDDING, OUTPUT, VOCAB_MATRICES
from megatron_ct.config.schedule import Schedule, Stage
from megatron_ct.errors import ConfigError
from megatron_ct.training.stages import StageTracker

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.")  # after the layer prefix
EXPERTS = "decoder.layers.*.mlp.experts.*"
ROUTER = "decoder.layers.*.mlp.router.*"


def global_named_parameters(chunk: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Parameters of one model chunk under TP1/PP1/EP1 names (global layer and expert numbers)."""
    offsets, experts = {}, {}
    decoder = getattr(chunk, "decoder", None)
    if decoder is not None:
        for local, layer in enumerate(decoder.layers):
            offsets[local] = layer.layer_number - 1  # megatron-core numbers layers globally from 1
            # MoELayer: this EP rank's experts, local_experts.<i> is expert local_expert_indices[i]
            experts[local] = getattr(getattr(layer, "mlp", None), "local_expert_indices", None)
    out = {}
    for name, param in chunk.named_parameters():
        m = _LAYER.match(name)
        if m:
            local, rest = int(m.group(1)), name[m.end() :]
            e = _EXPERT.match(rest)
            if e and experts[local] is not None:
                rest = f"mlp.experts.local_experts.{experts[local][int(e.group(1))]}." + rest[e.end() :]
            name = f"decoder.layers.{offsets[local]}." + rest
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
        elif p == "experts":
            out.append(EXPERTS)
        elif p == "router":
            out.append(ROUTER)
        else:
            out.append(p)
    return out


def _stack_of(name: str) -> str:
    """The checkpoint tensor ``name`` is stored in, as a template over its stacked axes:
    ``decoder.layers.{layer}.<rest>`` (``[L, ...]``), for an expert's weight
    ``decoder.layers.{layer}.mlp.experts.local_experts.{expert}.<rest>`` (``[L, E, ...]``)."""
    m = _LAYER.match(name)
    if not m:
        return name
    rest = name[m.end() :]
    e = _EXPERT.match(rest)
    if e:
        return "decoder.layers.{layer}.mlp.experts.local_experts.{expert}." + rest[e.end() :]
    return "decoder.layers.{layer}." + rest


def _stack_members(stack: str, num_layers: int, num_experts: int) -> list[str]:
    """Every global name in the checkpoint tensor ``stack`` (a :func:`_stack_of` template)."""
    experts = range(num_experts) if "{expert}" in stack else [0]
    return [stack.format(layer=i, expert=x) for i in range(num_layers) for x in experts]


def param_class(name: str, new_block_layers: list[int] | None) -> str:
    """The LR class of a global parameter name (new_vocab_rows are rows, not parameters)."""
    if name == EMBEDDING:
        return "embedding"
    if name == OUTPUT:
        return "output"
    m = _LAYER.match(name)
    if m and new_block_layers and int(m.group(1)) in new_block_layers:
        return "new_blocks"
    if fnmatch.fnmatchcase(name, EXPERTS):
        return "experts"
    if fnmatch.fnmatchcase(name, ROUTER):
        return "router"
    return "body"


BODY_CLASSES = ("new_blocks", "experts", "router")  # parts of the body: body's multiplier unless set


def class_multiplier(lr_mult: dict, cls: str) -> float:
    """A class's multiplier in a stage; the sub-classes default to their parent's."""
    if cls in lr_mult:
        return float(lr_mult[cls])
    return float(lr_mult.get("body", 1.0)) if cls in BODY_CLASSES else 1.0


@dataclass(frozen=True)
class GroupPolicy:
    """How the parameters of one optimizer param group train, stage by stage."""

    lr_mult: tuple[float, ...]
    """Per stage: the multiplier on the scheduled LR (0: frozen)."""

    @property
    def key(self) -> str:
        """The group's identity (same on every rank and across save/load)."""
        return "lr[" + ",".join(f"{m:g}" for m in self.lr_mult) + "]"


@dataclass(frozen=True)
class RowPolicy:
    """Old and appended rows of a vocabulary matrix, stage by stage: each region's fraction of
    the group's update (one of the two is 1 where the matrix trains)."""

    first_new_row: int
    old: tuple[float, ...]
    new: tuple[float, ...]


def optimizer_settings(config: dict) -> dict[str, Any]:
    """The settings that shape the optimizer's parameters and groups (what trains, at which LR
    multipliers), by config key, from a config dict (``config_to_dict``'s form, which a
    checkpoint records): a resume whose settings differ may not fit the saved optimizer state."""
    train = config.get("train") or {}
    out = {f"train.{k}": train.get(k) for k in ("trainable_params", "lr_mult")}
    for i, stage in enumerate((config.get("data") or {}).get("stages") or []):
        out.update({f"data.stages[{i}].{k}": stage.get(k) for k in ("trainable_params", "lr_mult")})
    return out


class FreezePlan:
    """Per-parameter policies for every stage of the schedule. Collective to build (checks
    that every pattern matches some parameter on some rank)."""

    def __init__(
        self,
        chunks: list[torch.nn.Module],
        schedule: Schedule,
        num_layers: int,
        provenance: dict,
        stages: StageTracker | None = None,
    ) -> None:
        self.schedule = schedule
        self.stages = stages or StageTracker(schedule)
        params: dict[str, torch.nn.Parameter] = {}
        for chunk in chunks:
            params.update(global_named_parameters(chunk))
        stages = schedule.stages
        n = len(stages)
        new_blocks = provenance.get("new_block_layers")
        expansion = provenance.get("vocab_expansion")
        num_experts = getattr(getattr(chunks[0], "config", None), "num_moe_experts", None) or 0
        globs = [expand_patterns(st.trainable_params, new_blocks) if st.trainable_params else None for st in stages]
        holds = [bool(st.trainable_params and "new_vocab_rows" in st.trainable_params) for st in stages]
        self._check_patterns_match(params, stages, globs)

        def trains(name: str, i: int) -> bool:
            return globs[i] is None or any(fnmatch.fnmatchcase(name, g) for g in globs[i])

        self.policies: dict[str, GroupPolicy] = {}
        self._policy_of: dict[int, GroupPolicy] = {}  # id(param) -> policy
        self.rows: dict[int, tuple[torch.nn.Parameter, RowPolicy]] = {}  # id(param) -> vocab matrix rows
        self.total = sum(p.numel() for p in params.values())
        self._numel: dict[str, int] = {}  # policy key -> elements on this rank
        stack_trains: dict[str, bool] = {}  # checkpoint tensor (_stack_of) -> some part of it trains
        for name, param in params.items():
            flags = [trains(name, i) for i in range(n)]
            if not any(flags):
                # Pure function of (patterns, num_layers, num_experts): every rank (every EP
                # rank, holding other experts) decides the same per stack.
                stack = _stack_of(name)
                if stack not in stack_trains:  # once per stack (a MoE's expert stacks hold L x E names)
                    members = _stack_members(stack, num_layers, num_experts)
                    stack_trains[stack] = any(trains(other, i) for other in members for i in range(n))
                if not stack_trains[stack]:
                    param.requires_grad_(False)
                    continue
            cls = param_class(name, new_blocks)
            mult = [class_multiplier(st.lr_mult, cls) if flags[i] else 0.0 for i, st in enumerate(stages)]
            if cls in ("embedding", "output") and expansion:
                old = [0.0 if holds[i] else m for i, m in enumerate(mult)]
                new = [
                    class_multiplier(st.lr_mult, "new_vocab_rows") if "new_vocab_rows" in st.lr_mult else m
                    for m, st in zip(mult, stages, strict=True)
                ]
                new = [v if flags[i] else 0.0 for i, v in enumerate(new)]
                mult = [max(o, w) for o, w in zip(old, new, strict=True)]
                if old != mult or new != mult:
                    self.rows[id(param)] = (
                        param,
                        RowPolicy(
                            first_new_row=expansion["old_vocab_size"],
                            old=tuple(o / m if m else 0.0 for o, m in zip(old, mult, strict=True)),
                            new=tuple(w / m if m else 0.0 for w, m in zip(new, mult, strict=True)),
                        ),
                    )
            policy = GroupPolicy(lr_mult=tuple(mult))
            policy = self.policies.setdefault(policy.key, policy)  # one object per policy
            self._policy_of[id(param)] = policy
            self._numel[policy.key] = self._numel.get(policy.key, 0) + param.numel()
        for param, rows in self.rows.values():
            _hold_gradient_rows(param, rows, self)
        # Logged LR per class: the multiplier of each class present in the model.
        classes = {param_class(name, new_blocks) for name in params} | ({"new_vocab_rows"} if expansion else set())
        self.classes = sorted(classes)

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

    @property
    def stage(self) -> Stage:
        """The current stage (the tracker's; the first before the run enters one): row scaling
        and held rows follow it."""
        return self.stages.current or self.schedule.stages[0]

    def trainable_elements(self) -> int:
        """Elements of this rank's parameters that learn in the current stage."""
        i = self.stage.index
        return sum(n for key, n in self._numel.items() if self.policies[key].lr_mult[i] > 0)

    def class_multipliers(self) -> dict[str, float]:
        """The current stage's configured LR multiplier of each class present (for the
        metrics; what trainable_params freezes is reported separately)."""
        lr_mult = self.stage.lr_mult
        out = {cls: class_multiplier(lr_mult, cls) for cls in self.classes}
        if "new_vocab_rows" in out and "new_vocab_rows" not in lr_mult:
            out["new_vocab_rows"] = class_multiplier(lr_mult, "embedding")
        return out


def _hold_gradient_rows(param: torch.nn.Parameter, rows: RowPolicy, plan: FreezePlan) -> None:
    """Zero the gradient of a row region whose share is 0 in the current stage, before
    megatron-core's DDP accumulates it, so Adam's moments of held rows stay as they were.
    This TP rank holds the contiguous rows ``[tp_rank * local, (tp_rank + 1) * local)``."""
    from megatron.core import parallel_state

    local = param.shape[0]
    start = parallel_state.get_tensor_model_parallel_rank() * local
    split = max(0, min(local, rows.first_new_row - start))  # local rows below it are old

    def hook(grad: torch.Tensor) -> torch.Tensor:
        i = plan.stage.index
        held_old, held_new = rows.old[i] == 0.0 and split > 0, rows.new[i] == 0.0 and split < local
        if not (held_old or held_new):
            return grad
        grad = grad.clone()
        if held_old:
            grad[:split] = 0
        if held_new:
            grad[split:] = 0
        return grad

    param.register_hook(hook)


class RowScaling:
    """Per-row LR within the vocabulary matrices, as a step hook on the optimizer.

    Before the inner optimizer steps, the main-parameter rows whose share is below 1 are
    copied; after it, they are set to ``before + share * (after - before)``: their update (Adam
    step and decoupled decay) scaled by the share, i.e. their LR times it; share 0 restores
    them bit for bit. Works on the main (FP32) parameters of megatron-core's optimizers: the
    model parameters themselves (FP32), their FP32 copies (bf16/fp16), or this rank's flat
    shard (distributed optimizer), before they are copied back to the model.
    """

    def __init__(self, plan: FreezePlan, optimizer) -> None:
        from megatron.core import parallel_state

        self.plan = plan
        self._regions: dict[int, list[tuple[torch.Tensor, int, int, RowPolicy, str]]] = {}
        if not plan.rows:
            return
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
            inner = opt.optimizer
            for param, rows in plan.rows.values():
                found = _main_param(opt, param)
                if found is None:
                    continue
                main, offset = found  # main: 1-D view; offset: its first element in the local param
                local, h = param.shape[0], param.shape[1]
                split = max(0, min(local, rows.first_new_row - tp_rank * local)) * h
                for region, lo, hi in (("old", 0, split), ("new", split, local * h)):
                    lo, hi = max(lo, offset), min(hi, offset + main.numel())
                    if lo < hi:
                        self._regions.setdefault(id(inner), []).append((main, lo - offset, hi - offset, rows, region))
            if id(inner) in self._regions:
                inner.register_step_pre_hook(self._before)
                inner.register_step_post_hook(self._after)
        self._saved: list[torch.Tensor | None] = []

    def _active(self, inner):
        i = self.plan.stage.index
        for main, lo, hi, rows, region in self._regions.get(id(inner), []):
            share = rows.old[i] if region == "old" else rows.new[i]
            if share < 1.0:
                yield main, lo, hi, share

    def _before(self, inner, args, kwargs) -> None:
        self._saved = [main[lo:hi].clone() for main, lo, hi, _ in self._active(inner)]

    def _after(self, inner, args, kwargs) -> None:
        for (main, lo, hi, share), before in zip(self._active(inner), self._saved, strict=True):
            main[lo:hi] = torch.lerp(before, main[lo:hi], share)  # share 0: exactly `before`
        self._saved = []


def _main_param(opt, model_param: torch.nn.Parameter) -> tuple[torch.Tensor, int] | None:
    """The optimizer's main (FP32) copy of ``model_param`` as a flat view, and the flat index
    in the model parameter where it starts; None if this optimizer does not hold it."""
    index_map = getattr(opt, "model_param_group_index_map", None)
    if index_map is not None:  # distributed optimizer: this rank's shard of the flat parameter
        if model_param not in index_map:
            return None
        group, order = index_map[model_param]
        main = opt.optimizer.param_groups[group]["params"][order]
        return main.view(-1), opt._get_model_param_range_map(model_param)["param"].start
    for model_group, main_group in zip(
        getattr(opt, "float16_groups", []), getattr(opt, "fp32_from_float16_groups", []), strict=True
    ):
        for p, main in zip(model_group, main_group, strict=True):
            if p is model_param:
                return main.view(-1), 0
    for group in opt.optimizer.param_groups:  # FP32 parameters are their own main copies
        if any(p is model_param for p in group["params"]):
            return model_param.data.view(-1), 0
    return None
