"""Router health of a mixture of experts: load-balancing losses, expert load, dropped tokens.

Counting is per micro-batch and stays on the device: a forward hook on every layer's router
(megatron-core's ``TopKRouter``, whose output is ``(probs, routing_map)``, ``routing_map`` a
``[T, E]`` boolean of the token slots each expert receives) adds the map's column sums to an
``[L, E]`` counter and the slots it dropped (``T * k`` minus those routed: a capacity factor,
``model.moe_expert_capacity_factor``) to an ``[L]`` one. The hook counts only what megatron-core
counts for its losses: training forwards with gradients (not evaluations, not the no-grad first
pass of full recomputation). megatron-core itself saves each layer's load-balancing loss (and
z-loss) to its tracker (``moe_utils.save_to_aux_losses_tracker``), per micro-batch, in the same
forward; its values are read from there, not recomputed.

On log steps :meth:`RouterHealth.report` packs counters and tracker values of this rank into one
tensor and all-reduces it once over the world (no collective per micro-batch), then clears both.
Every rank routes its own tokens (its data-parallel batch; under sequence or context
parallelism its share of the sequence) and holds the routers of its pipeline stage, so the sum
over all ranks is the global count (tensor-parallel ranks without sequence parallelism see the
same tokens: divided by TP). Load-balancing losses are, per micro-batch, sums of the TP x CP
ranks' parts (megatron-core's partial losses); z-losses are each rank's mean. Both are averaged
over the interval's micro-batches, so the numbers do not depend on the parallel layout.
(megatron-core's own ``track_moe_metrics`` reduces each loss with two or three collectives of
its own and leaves the z-loss rank-local: its values are taken, its reduction is not.)

The metrics record gets (``L`` layers in order, experts in order, 0-based):

- ``moe_aux_loss``: megatron-core's load-balancing loss without its coefficient
  (``E * sum_i f_i P_i``; 1.0 when perfectly balanced), mean over layers; per layer in
  ``moe_aux_loss_layers``. Only with ``model.moe_aux_loss_coeff > 0`` (else megatron-core does not
  compute it). ``moe_z_loss`` / ``moe_z_loss_layers`` likewise with ``model.moe_z_loss_coeff``.
- ``moe_expert_load``: ``[L][E]`` fraction of the interval's routed token slots (tokens x top-k)
  each expert received; a layer's fractions sum to 1 less its dropped share.
- ``moe_dropped_tokens``: token slots dropped in the interval, all layers (0 without a capacity).

An expert that received no token in ``logging.moe_dead_expert_intervals`` consecutive log
intervals gets one warning line naming its layer and index (rank 0); it warns again only after
it has received tokens and died once more. The count starts with the job (a resumed run starts
over).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# megatron-core's tracker names (moe/router.py).
AUX_LOSS = "load_balancing_loss"
Z_LOSS = "z_loss"


def routers(model_chunks) -> list:
    """Every MoE router (megatron-core ``TopKRouter``) of this rank's chunks, in layer order."""
    from megatron.core.transformer.moe.router import TopKRouter

    found = [m for chunk in model_chunks for m in chunk.modules() if isinstance(m, TopKRouter)]
    return sorted(found, key=lambda r: r.layer_number)


class DeadExperts:
    """Which experts received no tokens for ``intervals`` consecutive log intervals; one warning
    per expert until it receives tokens again. ``intervals`` None or 0: never warns."""

    def __init__(self, intervals: int | None) -> None:
        self.intervals = intervals
        self._idle: torch.Tensor | None = None  # [L, E] consecutive intervals without a token
        self._warned: set[tuple[int, int]] = set()

    def update(self, iteration: int, counts: torch.Tensor) -> list[str]:
        """``counts``: ``[L, E]`` token slots of the interval ending at ``iteration``. Returns
        the warnings (also logged)."""
        if not self.intervals:
            return []
        idle = counts == 0
        self._idle = idle.long() if self._idle is None else (self._idle + 1) * idle
        lines = []
        for layer, expert in (self._idle >= self.intervals).nonzero().tolist():
            if (layer, expert) not in self._warned:
                self._warned.add((layer, expert))
                idle = int(self._idle[layer, expert])
                lines.append(
                    f"dead expert: layer {layer}, expert {expert} received no tokens in {idle} consecutive log "
                    f"intervals (up to iteration {iteration}; logging.moe_dead_expert_intervals={self.intervals})"
                )
        self._warned = {(li, e) for li, e in self._warned if self._idle[li, e] > 0}  # recovered: re-armed
        for line in lines:
            log.warning(line)
        return lines


class RouterHealth:
    """Hooks on this rank's routers and the log-step report; see the module docstring.

    ``token_copies``: how many ranks route the same tokens (TP without sequence parallelism,
    else 1); ``tp_cp``: the ranks a micro-batch's load-balancing loss is split over."""

    def __init__(
        self,
        model_chunks,
        *,
        num_layers: int,
        num_experts: int,
        topk: int,
        aux_loss: bool,
        z_loss: bool,
        token_copies: int = 1,
        tp_cp: int = 1,
        dead_expert_intervals: int | None = None,
        device: torch.device | str = "cpu",
        is_writer: bool = True,
    ) -> None:
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        self.num_layers, self.num_experts, self.topk = num_layers, num_experts, topk
        self.names = [n for n, on in ((AUX_LOSS, aux_loss), (Z_LOSS, z_loss)) if on]
        self.token_copies, self.tp_cp = token_copies, tp_cp
        self.is_writer = is_writer
        self.dead = DeadExperts(dead_expert_intervals)
        # On the device, summed over the interval's micro-batches. int64: exact counts.
        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.int64, device=device)  # [L, E]
        self.dropped = torch.zeros(num_layers, dtype=torch.int64, device=device)  # [L]
        self.forwards = torch.zeros(num_layers, dtype=torch.int64, device=device)  # [L] micro-batches routed
        tracker = get_moe_layer_wise_logging_tracker()
        for name in self.names:  # megatron-core's tracker is process-wide: start from zero here
            tracker.pop(name, None)
        self._handles = [r.register_forward_hook(self._count) for r in routers(model_chunks)]

    def _count(self, router, _inputs, output) -> None:
        if not (router.training and torch.is_grad_enabled()):
            return
        _probs, routing_map = output  # [T, E] bool
        i = router.layer_number - 1
        routed = routing_map.sum(dim=0)  # [E] on the device: no host sync
        self.counts[i] += routed
        self.dropped[i] += routing_map.shape[0] * self.topk - routed.sum()
        self.forwards[i] += 1

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def report(self, iteration: int) -> dict:
        """Collective (every rank, log steps): the record's ``moe_*`` fields of the interval
        since the last report, identical on every rank; the dead-expert warning on rank 0."""
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        L, E = self.num_layers, self.num_experts
        tracker = get_moe_layer_wise_logging_tracker()
        losses = []
        for name in self.names:
            entry = tracker.get(name)
            values = entry["values"] if entry is not None else torch.zeros(L)
            losses.append(values.to(self.counts.device, torch.float64))
        # One tensor, one all-reduce: [L*E counts | L dropped | L forwards | L per tracked loss].
        packed = torch.cat([self.counts.reshape(-1).double(), self.dropped.double(), self.forwards.double(), *losses])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(packed)
        for entry in (tracker.get(n) for n in self.names):
            if entry is not None:
                entry["values"].zero_()
        self.counts.zero_()
        self.dropped.zero_()
        self.forwards.zero_()

        packed = packed.cpu()  # host sync: log steps only
        counts = packed[: L * E].reshape(L, E) / self.token_copies
        dropped = packed[L * E : L * E + L] / self.token_copies
        forwards = packed[L * E + L : L * E + 2 * L]  # (rank, micro-batch) pairs per layer
        slots = (counts.sum(dim=1) + dropped).clamp(min=1)
        record = {
            "moe_expert_load": (counts / slots[:, None]).tolist(),
            "moe_dropped_tokens": int(round(float(dropped.sum()))),
        }
        rows = packed[L * E + 2 * L :].reshape(len(self.names), L)
        for name, values in zip(self.names, rows, strict=True):
            if name == AUX_LOSS:  # a micro-batch's loss is the sum of its TP x CP ranks' parts
                per_layer = values * self.tp_cp / forwards.clamp(min=1)
                key = "moe_aux_loss"
            else:  # each rank's mean over its tokens
                per_layer = values / forwards.clamp(min=1)
                key = "moe_z_loss"
            record[key] = float(per_layer.mean())
            record[f"{key}_layers"] = per_layer.tolist()
        if self.is_writer:
            self.dead.update(iteration, counts)
        return record
