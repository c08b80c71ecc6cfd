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
it has received tokens and died once more.

Both survive a restart: :class:`RouterHealth` is a checkpoint component (``router_health``) whose
state is the open interval's sums, reduced over the ranks and stored in layout-free units (token
slots, micro-batches), and the dead-expert counter, so a resumed run (at any layout) reports the
interval it was saved in whole and warns at the iteration the uninterrupted run warns at.
Checkpoints without it load with the sums and the counter at zero.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# megatron-core's tracker names (moe/router.py).
AUX_LOSS = "load_balancing_loss"
Z_LOSS = "z_loss"
_STATE_KEYS = {AUX_LOSS: "aux_loss_sums", Z_LOSS: "z_loss_sums"}  # in the checkpoint


def routers(model_chunks) -> list:
    """Every MoE router (megatron-core ``TopKRouter``) of this rank's chunks, in layer order."""
    from megatron.core.transformer.moe.router import TopKRouter

    found = [m for chunk in model_chunks for m in chunk.modules() if isinstance(m, TopKRouter)]
    return sorted(found, key=lambda r: r.layer_number)


class DeadExperts:
    """Which experts received no tokens for ``intervals`` consecutive log intervals; one warning
    per expert until it receives tokens again. ``intervals`` None or 0: never warns. Every rank
    keeps the same count (so every rank's checkpoint state is the same); ``logs``: this one
    writes the warnings to the log."""

    def __init__(self, intervals: int | None, logs: bool = True) -> None:
        self.intervals = intervals
        self.logs = logs
        self._idle: torch.Tensor | None = None  # [L, E] consecutive intervals without a token
        self._warned: set[tuple[int, int]] = set()

    def state_dict(self) -> dict:
        idle = None if self._idle is None else self._idle.tolist()
        return {"idle": idle, "warned": sorted([li, e] for li, e in self._warned)}

    def load_state_dict(self, state: dict) -> None:
        idle = state.get("idle")
        self._idle = None if idle is None else torch.tensor(idle, dtype=torch.int64)
        self._warned = {(int(li), int(e)) for li, e in state.get("warned") or []}

    def update(self, iteration: int, counts: torch.Tensor) -> list[str]:
        """``counts``: ``[L, E]`` token slots of the interval ending at ``iteration``. Returns
        the warnings (logged where ``logs``)."""
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
        for line in lines if self.logs else []:
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
        self.dead = DeadExperts(dead_expert_intervals, logs=is_writer)
        # On the device, summed over the interval's micro-batches. int64: exact counts.
        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.int64, device=device)  # [L, E]
        self.dropped = torch.zeros(num_layers, dtype=torch.int64, device=device)  # [L]
        self.forwards = torch.zeros(num_layers, dtype=torch.int64, device=device)  # [L] micro-batches routed
        # The interval a resumed run was saved in, as this layout's sums (see _packed); the writer's.
        self._carried: torch.Tensor | None = None
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

    def _packed(self) -> torch.Tensor:
        """This rank's interval sums as one float64 tensor (the carried interval added on the
        writer): ``[L*E counts | L dropped | L forwards | L per tracked loss]``."""
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        tracker = get_moe_layer_wise_logging_tracker()
        losses = []
        for name in self.names:
            entry = tracker.get(name)
            values = entry["values"] if entry is not None else torch.zeros(self.num_layers)
            losses.append(values.to(self.counts.device, torch.float64))
        packed = torch.cat([self.counts.reshape(-1).double(), self.dropped.double(), self.forwards.double(), *losses])
        if self._carried is not None:
            packed += self._carried.to(packed.device)
        return packed

    def _reduced(self) -> torch.Tensor:
        """Collective: the interval sums of all ranks (one all-reduce), on the host."""
        packed = self._packed()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(packed)
        return packed.cpu()  # host sync: log steps and saves only

    def _split(self, packed: torch.Tensor) -> tuple[torch.Tensor, ...]:
        L, E = self.num_layers, self.num_experts
        counts = packed[: L * E].reshape(L, E)
        return counts, packed[L * E : L * E + L], packed[L * E + L : L * E + 2 * L], packed[L * E + 2 * L :]

    def _loss_scale(self, name: str) -> int:
        """A tracked loss's sum over ranks per its layout-free sum over micro-batches: the
        load-balancing loss's TP x CP parts add up to the micro-batch's; each rank has its own
        z-loss mean."""
        return 1 if name == AUX_LOSS else self.tp_cp

    def state_dict(self) -> dict:
        """Collective (every rank saves): the open interval's sums over all ranks in layout-free
        units (token slots; micro-batches; load-balancing losses summed over micro-batches, z-losses
        over micro-batches' rank means) and the dead-expert count. The interval is not cleared."""
        counts, dropped, forwards, losses = self._split(self._reduced())
        rows = dict(zip(self.names, losses.reshape(len(self.names), self.num_layers), strict=True))
        return {
            "counts": (counts / self.token_copies).round().long().tolist(),
            "dropped": (dropped / self.token_copies).round().long().tolist(),
            "micro_batches": (forwards / self.tp_cp).round().long().tolist(),
            **{_STATE_KEYS[name]: (row / self._loss_scale(name)).tolist() for name, row in rows.items()},
            "dead_experts": self.dead.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """The saved interval becomes the writer's start of this one, in this layout's units."""
        L, E = self.num_layers, self.num_experts
        counts = torch.tensor(state["counts"], dtype=torch.float64)
        if counts.shape != (L, E):
            log.info(
                "router health: the checkpoint's [layers, experts] %s is not this model's; not restored",
                list(counts.shape),
            )
            return
        self.dead.load_state_dict(state["dead_experts"])
        if not self.is_writer:
            return
        micro_batches = torch.tensor(state["micro_batches"], dtype=torch.float64)
        losses = [
            torch.tensor(state.get(_STATE_KEYS[name], [0.0] * L), dtype=torch.float64) * self._loss_scale(name)
            for name in self.names
        ]
        dropped = torch.tensor(state["dropped"], dtype=torch.float64)
        self._carried = torch.cat(
            [counts.reshape(-1) * self.token_copies, dropped * self.token_copies, micro_batches * self.tp_cp, *losses]
        )

    def report(self, iteration: int) -> dict:
        """Collective (every rank, log steps): the record's ``moe_*`` fields of the interval
        since the last report, identical on every rank; the dead-expert warning on rank 0."""
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        packed = self._reduced()
        tracker = get_moe_layer_wise_logging_tracker()
        for entry in (tracker.get(n) for n in self.names):
            if entry is not None:
                entry["values"].zero_()
        self.counts.zero_()
        self.dropped.zero_()
        self.forwards.zero_()
        self._carried = None

        counts, dropped, forwards, losses = self._split(packed)  # forwards: (rank, micro-batch) pairs per layer
        counts, dropped = counts / self.token_copies, dropped / self.token_copies
        slots = (counts.sum(dim=1) + dropped).clamp(min=1)
        record = {
            "moe_expert_load": (counts / slots[:, None]).tolist(),
            "moe_dropped_tokens": int(round(float(dropped.sum()))),
        }
        for name, values in zip(self.names, losses.reshape(len(self.names), self.num_layers), strict=True):
            if name == AUX_LOSS:  # a micro-batch's loss is the sum of its TP x CP ranks' parts
                per_layer = values * self.tp_cp / forwards.clamp(min=1)
                key = "moe_aux_loss"
            else:  # each rank's mean over its tokens
                per_layer = values / forwards.clamp(min=1)
                key = "moe_z_loss"
            record[key] = float(per_layer.mean())
            record[f"{key}_layers"] = per_layer.tolist()
        self.dead.update(iteration, counts)
        return record
