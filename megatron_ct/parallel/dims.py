"""The parallel dimensions of a run, built and checked once: TP x CP x PP x DP ranks, EP, VPP.

Ranks are laid out as megatron-core's parallel state lays them out: tensor parallelism (TP)
innermost, then context parallelism (CP), data parallelism (DP), pipeline parallelism (PP)
outermost; expert parallelism (EP) splits the experts of MoE layers over DP x CP ranks; VPP is
the number of model chunks per pipeline rank (interleaved 1F1B).

:meth:`ParallelDims.build` is the one place the world size and the model are checked against
the ``parallel`` section; the trainer, the converter and the evaluation tool all go through it
and get the same one-line :class:`~megatron_ct.errors.ConfigError` naming the key they were given.
What tensor parallelism must divide comes from the model's family
(:meth:`~megatron_ct.families.spec.ModelFamily.valid_tp_sizes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from megatron_ct.errors import ConfigError

if TYPE_CHECKING:
    from megatron_ct.config.schema import ModelConfig, ParallelConfig

# The config key each size comes from; tools pass their own flag names instead.
KEYS = {
    "tp": "parallel.tensor_model_parallel_size",
    "pp": "parallel.pipeline_model_parallel_size",
    "cp": "parallel.context_parallel_size",
    "ep": "parallel.expert_model_parallel_size",
    "vpp": "parallel.virtual_pipeline_model_parallel_size",
    "sp": "parallel.sequence_parallel",
}


@dataclass(frozen=True)
class ParallelDims:
    """How the world is split. Build it with :meth:`build`; it is immutable afterwards."""

    world_size: int
    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    ep: int = 1
    vpp: int | None = None
    """Model chunks per pipeline rank; None: one (plain 1F1B)."""
    sequence_parallel: bool = False

    @classmethod
    def build(
        cls,
        world_size: int,
        model: ModelConfig,
        *,
        tp: int = 1,
        pp: int = 1,
        cp: int = 1,
        ep: int = 1,
        vpp: int | None = None,
        sequence_parallel: bool = False,
        keys: dict[str, str] | None = None,
    ) -> ParallelDims:
        """Check the sizes against the world and the model; raise ConfigError or return the dims."""
        from megatron_ct.families import family_of

        k = {**KEYS, **(keys or {})}
        for name, size in (("tp", tp), ("pp", pp), ("cp", cp), ("ep", ep)):
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise ConfigError(f"{k[name]}: expected an integer >= 1, got {size!r}")
        family = family_of(model)
        sizes = family.valid_tp_sizes(model)
        if tp not in sizes:
            raise ConfigError(
                f"{k['tp']}: expected one of {', '.join(map(str, sizes))} ({family.tp_requirement(model)}), got {tp}"
            )
        chunks = pp * (vpp or 1)
        if model.num_layers % chunks != 0:
            raise ConfigError(
                f"{k['vpp'] if vpp else k['pp']}: expected pipeline stages x virtual stages ({pp}x{vpp or 1}) to "
                f"divide model.num_layers={model.num_layers}"
            )
        model_parallel = tp * pp * cp
        if world_size % model_parallel != 0:
            used = ["tp", "pp"] + (["cp"] if cp > 1 else [])
            names = "*".join(k[n] if i == 0 else k[n].removeprefix("parallel.") for i, n in enumerate(used))
            product = "*".join(str({"tp": tp, "pp": pp, "cp": cp}[n]) for n in used)
            raise ConfigError(
                f"{names}: expected a divisor of the world size {world_size}, got {product}={model_parallel}"
            )
        dp = world_size // model_parallel
        if sequence_parallel and tp == 1:
            raise ConfigError(f"{k['sp']}: expected false when tensor_model_parallel_size is 1, got True")
        if ep > 1 and not family.moe:
            raise ConfigError(
                f"{k['ep']}: expected 1 for model family {family.name} (it has no experts to split), got {ep}"
            )
        if family.moe and model.num_experts % ep != 0:
            raise ConfigError(f"{k['ep']}: expected a divisor of model.num_experts={model.num_experts}, got {ep}")
        if (dp * cp) % ep != 0:
            raise ConfigError(f"{k['ep']}: expected a divisor of data x context parallel size {dp * cp}, got {ep}")
        return cls(world_size, tp, pp, cp, dp, ep, vpp, sequence_parallel)

    @classmethod
    def from_config(cls, p: ParallelConfig, model: ModelConfig, world_size: int) -> ParallelDims:
        """The ``parallel`` section of a run against its world and model."""
        return cls.build(
            world_size,
            model,
            tp=p.tensor_model_parallel_size,
            pp=p.pipeline_model_parallel_size,
            cp=p.context_parallel_size,
            ep=p.expert_model_parallel_size,
            vpp=p.virtual_pipeline_model_parallel_size,
            sequence_parallel=p.sequence_parallel,
        )

    @property
    def model_chunks(self) -> int:
        """Model chunks this rank holds (virtual pipeline stages)."""
        return self.vpp or 1

    def describe(self) -> str:
        """'TP2 PP2 VPP2 DP1' (CP and EP only when used)."""
        parts = [f"TP{self.tp}", f"PP{self.pp}"]
        parts += [f"VPP{self.vpp}"] if self.vpp else []
        parts += [f"CP{self.cp}"] if self.cp > 1 else []
        parts += [f"DP{self.dp}"]
        parts += [f"EP{self.ep}"] if self.ep > 1 else []
        return " ".join(parts)

    def megatron_core_sizes(self) -> dict[str, int | None]:
        """Arguments of megatron-core's ``parallel_state.initialize_model_parallel``."""
        return {
            "tensor_model_parallel_size": self.tp,
            "pipeline_model_parallel_size": self.pp,
            "virtual_pipeline_model_parallel_size": self.vpp,
            "context_parallel_size": self.cp,
            "expert_model_parallel_size": self.ep,
        }
