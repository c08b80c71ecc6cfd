"""Proxy runs for the D-CPT fit: one pretrain_ct.py config per (ratio, token budget, model size).

A point's config is the base recipe (plus command-line overrides and the point's model
overrides), resolved and validated, with the swept stages' blends rewritten: the domain
datasets share ``r`` of the blend and the general datasets ``1 - r``, each group keeping the
base blend's proportions inside it (an equal split when the base gives the group no weight).
Ramps (``end_blend``) of swept stages are dropped, so the ratio is constant; swept stages
follow one another, and stages after them are left out of the proxy run (they are not at
ratio r). Each point writes its logs into its own directory (no checkpoints: a proxy run is
measured by its evaluations); ``eval.jsonl`` there gives many (tokens, loss) points per run.

Layout of a sweep directory::

    sweep.json                      the points (name, ratio, tokens, model, params)
    <point>/config.yaml             what pretrain_ct.py --config reads
    <point>/mixture_point.json      ratio, domain/general datasets, swept stages, params
    <point>/train.log, eval.jsonl, metrics.jsonl, run.json (exit status, seconds, config hash)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from megatron_ct.errors import ConfigError, DataError
from megatron_ct.families import family_of
from megatron_ct.mixture.observations import POINT_FILE, SWEEP_FILE, swept_span
from megatron_ct.mixture.report import write_text
from megatron_ct.parallel.launch import torchrun_command

REPO = Path(__file__).resolve().parents[2]
LOG_FILES = ("eval.jsonl", "metrics.jsonl", "samples.jsonl", "train.log", "run.json")


@dataclass(kw_only=True)
class SweepSpec:
    base_config: str
    """The base recipe (YAML)."""
    out: str
    """Sweep directory."""
    domain: list[str]
    """Datasets (names in data.datasets) that make the domain share."""
    general: list[str]
    """Datasets that make the rest of the blend."""
    ratios: list[float]
    """Domain shares to run."""
    stages: list[str] | None = None
    """Stages whose blend is swept; None: every stage."""
    token_budgets: list[float] | None = None
    """Training tokens at the mixture per run (the last swept stage runs until then); None: the
    recipe's stage lengths (or train.train_iters for an open-ended last swept stage)."""
    models: list[tuple[str, list[str]]] = dataclasses.field(default_factory=list)
    """(label, overrides) per model size; empty: the recipe's model."""
    eval_interval: int | None = None
    """Overrides data.eval_interval."""
    overrides: list[str] = dataclasses.field(default_factory=list)
    """key=value overrides applied to every point."""


@dataclass(frozen=True)
class SweepPoint:
    name: str
    ratio: float
    tokens: float | None
    model: str | None
    params: int
    run_dir: str
    config_text: str
    record: dict

    @property
    def config_path(self) -> str:
        return os.path.join(self.run_dir, "config.yaml")


class RunFailed(Exception):
    """A proxy run exited non-zero."""


def _split_blend(ratio: float, base: dict[str, float], group: list[str]) -> dict[str, float]:
    weights = {d: float(base.get(d, 0.0)) for d in group}
    total = sum(weights.values())
    if total <= 0:
        weights, total = {d: 1.0 for d in group}, float(len(group))
    return {d: ratio * w / total for d, w in weights.items()}


def _point_name(ratio: float, tokens: float | None, model: str | None) -> str:
    name = f"r{ratio:g}"
    if tokens is not None:
        name += f"_tok{tokens:g}".replace("+", "")
    if model is not None:
        name += f"_{model}"
    return name


def _check_spec(spec: SweepSpec) -> None:
    if not spec.ratios:
        raise ConfigError("--ratios: expected at least one domain share")
    for r in spec.ratios:
        if not 0 <= r <= 1:
            raise ConfigError(f"--ratios: expected domain shares in [0, 1], got {r:g}")
    if len(set(spec.ratios)) != len(spec.ratios):
        raise ConfigError(f"--ratios: repeated ratio in {spec.ratios}")
    if not spec.domain or not spec.general:
        raise ConfigError("--domain and --general: expected at least one dataset name each")
    both = set(spec.domain) & set(spec.general)
    if both:
        raise ConfigError(f"--domain/--general: {', '.join(sorted(both))} named in both")
    for t in spec.token_budgets or []:
        if not t > 0:
            raise ConfigError(f"--tokens: expected token budgets > 0, got {t:g}")
    if spec.eval_interval is not None and spec.eval_interval < 1:
        raise ConfigError(f"--eval-interval: expected an integer >= 1, got {spec.eval_interval}")


def plan_sweep(spec: SweepSpec) -> list[SweepPoint]:
    """Every point's validated config; refuses (ConfigError) what cannot make a proxy run."""
    from megatron_ct.config import config_to_dict, load_config
    from megatron_ct.config.loader import build_config
    from megatron_ct.config.schedule import stage_iters, stage_seq_lengths

    _check_spec(spec)
    models = spec.models or [(None, [])]
    budgets = spec.token_budgets or [None]
    out_dir = os.path.abspath(spec.out)
    points = []
    for label, model_overrides in models:
        cfg = load_config(spec.base_config, [*spec.overrides, *model_overrides])
        data = cfg.data
        if data.source != "indexed":
            raise ConfigError(f"{spec.base_config}: data.source: expected 'indexed' (datasets and stages) for a sweep")
        for name in spec.domain + spec.general:
            if name not in data.datasets:
                raise ConfigError(
                    f"{spec.base_config}: data.datasets.{name}: expected a dataset named by --domain/--general "
                    f"(datasets: {', '.join(sorted(data.datasets))})"
                )
        if not data.valid:
            raise ConfigError(f"{spec.base_config}: data.valid: expected the validation sets the fit reads")
        interval = spec.eval_interval or data.eval_interval
        if not interval:
            raise ConfigError(
                f"{spec.base_config}: data.eval_interval: expected evaluations at several token counts "
                "per run (set it, or --eval-interval N)"
            )
        names = [s.name for s in data.stages]
        stages = spec.stages or names
        for i, stage in enumerate(data.stages):
            if stage.name not in stages:
                continue
            for ds in stage.blend:
                if ds not in spec.domain and ds not in spec.general:
                    raise ConfigError(
                        f"data.stages[{i}].blend.{ds}: dataset in neither --domain nor --general; name it in one"
                    )
        first, last = swept_span(names, stages, spec.base_config)
        iters = stage_iters(data, cfg.train.global_batch_size)
        start = sum(iters[:first])
        lengths = sorted(set(stage_seq_lengths(data)[first : last + 1]))
        if len(lengths) != 1:
            raise ConfigError(
                f"{spec.base_config}: data.stages: expected one sequence length over the swept stages (a token "
                f"budget is steps x global batch x length), got {lengths}"
            )
        tokens_per_iter = cfg.train.global_batch_size * lengths[0]
        for tokens in budgets:
            if tokens is None:
                # The recipe's lengths; an open-ended last swept stage runs to train.train_iters.
                end = cfg.train.train_iters
                if iters[last] is not None:
                    end = min(end, sum(iters[: last + 1]))
            else:
                end = start + math.ceil(tokens / tokens_per_iter)
                if sum(iters[first:last]) >= end - start:
                    raise ConfigError(
                        f"--tokens {tokens:g}: the swept stages before {names[last]!r} already take "
                        f"{sum(iters[first:last])} of its {end - start} steps"
                    )
            for ratio in spec.ratios:
                point_name = _point_name(ratio, tokens, label)
                run_dir = os.path.join(out_dir, point_name)
                # The proxy ends with the last swept stage: what follows it is not at ratio r.
                new_stages = []
                for stage in data.stages[: last + 1]:
                    if stage.name in stages:
                        blend = {
                            **_split_blend(ratio, stage.blend, spec.domain),
                            **_split_blend(1.0 - ratio, stage.blend, spec.general),
                        }
                        stage = dataclasses.replace(stage, blend=blend, end_blend=None)
                    new_stages.append(stage)
                if tokens is not None:  # the last swept stage runs to the budget
                    new_stages[-1] = dataclasses.replace(new_stages[-1], iters=None, tokens=None)
                if end - start < 3 * interval:
                    raise ConfigError(
                        f"point {point_name}: {end - start} steps at the mixture with data.eval_interval="
                        f"{interval}; the fit needs at least 3 evaluations per run (lower --eval-interval)"
                    )
                raw = config_to_dict(cfg)
                raw["data"]["stages"] = [dataclasses.asdict(s) for s in new_stages]
                raw["data"]["eval_interval"] = interval
                raw["train"]["train_iters"] = end
                raw["logging"]["log_dir"] = run_dir
                if raw["logging"]["tensorboard_dir"]:
                    raw["logging"]["tensorboard_dir"] = os.path.join(run_dir, "tensorboard")
                # A proxy run is measured by its evaluations; its weights are not kept.
                raw["checkpoint"]["save"] = None
                raw["checkpoint"]["save_interval"] = None
                point_cfg = build_config(raw, f"point {point_name}")  # validated as the trainer will
                record = {
                    "name": point_name,
                    "ratio": ratio,
                    "tokens": tokens,
                    "model": label,
                    "params": family_of(point_cfg.model).num_parameters(point_cfg.model),
                    "domain": list(spec.domain),
                    "general": list(spec.general),
                    "stages": list(stages),
                    "start_iter": start,
                    "tokens_per_iter": tokens_per_iter,
                    "train_iters": end,
                }
                header = (
                    f"# D-CPT proxy run {point_name}: domain share {ratio:g} of stages {', '.join(stages)}"
                    f" ({', '.join(spec.domain)} vs {', '.join(spec.general)}); written by tools/sweep_mixture.py\n"
                )
                text = header + yaml.safe_dump(config_to_dict(point_cfg), sort_keys=False)
                points.append(SweepPoint(point_name, ratio, tokens, label, record["params"], run_dir, text, record))
    return points


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def point_state(point: SweepPoint) -> str:
    """'new', 'done' (finished with this very config) or 'stale' (logs of another or unfinished run)."""
    run_json = os.path.join(point.run_dir, "run.json")
    if os.path.isfile(run_json):
        with open(run_json, encoding="utf-8") as f:
            run = json.load(f)
        if run.get("returncode") == 0 and run.get("config_sha256") == _sha(point.config_text):
            return "done"
    if any(os.path.exists(os.path.join(point.run_dir, f)) for f in LOG_FILES):
        return "stale"
    return "new"


def write_sweep(spec: SweepSpec, points: list[SweepPoint], force: bool = False, argv: list[str] = ()) -> dict:
    """Write sweep.json and every point's config; returns {point name: state}. An earlier run's
    logs in a point directory are refused, or with ``force`` moved to ``previous-<k>/``."""
    states = {p.name: point_state(p) for p in points}
    stale = [p for p in points if states[p.name] == "stale"]
    if stale and not force:
        raise DataError(
            f"{stale[0].run_dir}: holds logs of an unfinished run or one with another config "
            f"({len(stale)} point(s)); --force moves them to previous-<k>/ there"
        )
    os.makedirs(spec.out, exist_ok=True)
    for p in points:
        os.makedirs(p.run_dir, exist_ok=True)
        if states[p.name] == "stale":
            k = 1
            while os.path.exists(os.path.join(p.run_dir, f"previous-{k}")):
                k += 1
            keep = os.path.join(p.run_dir, f"previous-{k}")
            os.makedirs(keep)
            for entry in os.listdir(p.run_dir):
                if not entry.startswith("previous-") and entry not in ("config.yaml", POINT_FILE):
                    shutil.move(os.path.join(p.run_dir, entry), os.path.join(keep, entry))
            states[p.name] = "new"
        write_text(p.config_path, p.config_text)
        write_text(os.path.join(p.run_dir, POINT_FILE), json.dumps(p.record, indent=2) + "\n")
    sweep = {
        "base_config": os.path.abspath(spec.base_config),
        "domain": spec.domain,
        "general": spec.general,
        "stages": spec.stages,
        "ratios": spec.ratios,
        "token_budgets": spec.token_budgets,
        "models": [{"label": m, "overrides": o} for m, o in spec.models],
        "overrides": spec.overrides,
        "command": list(argv),
        "points": [p.record for p in points],
    }
    write_text(os.path.join(spec.out, SWEEP_FILE), json.dumps(sweep, indent=2) + "\n")
    return states


def trainer_command(config_path: str, nproc: int) -> list[str]:
    """pretrain_ct.py for one point: a plain process for one rank, torchrun for more."""
    return torchrun_command(
        nproc, REPO / "pretrain_ct.py", ["--config", config_path], standalone=True, plain_for_one=True
    )


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def run_local(points: list[SweepPoint], states: dict[str, str], nproc: int = 1, log=print) -> None:
    """Train the points one after another; a line per run with its time, rate and the ETA."""
    todo = [p for p in points if states.get(p.name) != "done"]
    for p in points:
        if states.get(p.name) == "done":
            log(f"{p.name}: already done (run.json), skipped")
    spent: list[float] = []
    for k, p in enumerate(todo, 1):
        steps = p.record["train_iters"]
        log(f"[{k}/{len(todo)}] {p.name}: training {steps} steps, log {os.path.join(p.run_dir, 'train.log')}")
        t0 = time.time()
        with open(os.path.join(p.run_dir, "train.log"), "w") as out:
            rc = subprocess.call(trainer_command(p.config_path, nproc), stdout=out, stderr=subprocess.STDOUT)
        seconds = time.time() - t0
        run = {"returncode": rc, "seconds": round(seconds, 3), "config_sha256": _sha(p.config_text)}
        write_text(os.path.join(p.run_dir, "run.json"), json.dumps(run) + "\n")
        if rc != 0:
            with open(os.path.join(p.run_dir, "train.log"), errors="replace") as f:
                lines = [li.strip() for li in f if li.strip()]
            last = next((li for li in reversed(lines) if "error" in li.lower()), lines[-1] if lines else "")
            raise RunFailed(f"{p.name} failed (exit {rc}): {last} (log: {os.path.join(p.run_dir, 'train.log')})")
        spent.append(seconds)
        tokens = (steps - p.record["start_iter"]) * p.record["tokens_per_iter"]
        eta = sum(spent) / len(spent) * (len(todo) - k)
        log(
            f"[{k}/{len(todo)}] {p.name}: done in {seconds:.1f} s ({tokens / seconds:,.0f} tokens/s); "
            f"ETA {_fmt_seconds(eta)} for {len(todo) - k} more"
        )


def slurm_array_script(points: list[SweepPoint], sweep_dir: str, nproc: int = 1, options: list[str] = ()) -> str:
    """A bash script for ``sbatch``: one array task per point, each training that point's config
    on one node with ``nproc`` processes (GPUs). ``DRY_RUN=1 SLURM_ARRAY_TASK_ID=k bash FILE``
    prints task k's command."""
    sweep_dir = os.path.abspath(sweep_dir)
    runs = "\n".join(f"  {shlex.quote(p.run_dir)}" for p in points)
    extra = "".join(f"#SBATCH {o}\n" for o in options)
    names = " ".join(f"{i}={p.name}" for i, p in enumerate(points))
    script = shlex.quote(str(REPO / "pretrain_ct.py"))
    return f"""#!/bin/bash
# D-CPT mixture sweep: one array task per proxy run, written by tools/sweep_mixture.py.
#   sbatch THIS_FILE                  # every point
#   sbatch --array=1,3 THIS_FILE      # some points ({names})
# Then: python tools/fit_mixture.py {shlex.quote(sweep_dir)} --domain-set ... --general-set ... --out ...
# DRY_RUN=1 SLURM_ARRAY_TASK_ID=k bash THIS_FILE prints task k's command.
#SBATCH --job-name=mixture-sweep
#SBATCH --array=0-{len(points) - 1}
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node={nproc}
#SBATCH --output={sweep_dir}/slurm-%A_%a.out
{extra}
set -euo pipefail
cd {shlex.quote(os.getcwd())}

RUNS=(
{runs}
)
RUN=${{RUNS[$SLURM_ARRAY_TASK_ID]}}
CMD=(torchrun --standalone --nproc_per_node {nproc} {script} --config "$RUN/config.yaml")

if [ "${{DRY_RUN:-0}}" = "1" ]; then
  echo "${{CMD[*]}}"
  exit 0
fi

START=$(date +%s)
set +e
srun "${{CMD[@]}}" > "$RUN/train.log" 2>&1
RC=$?
set -e
SHA=$(sha256sum "$RUN/config.yaml" | cut -d' ' -f1)
SECONDS_RUN=$(( $(date +%s) - START ))
echo "{{\\"returncode\\": $RC, \\"seconds\\": $SECONDS_RUN, \\"config_sha256\\": \\"$SHA\\"}}" > "$RUN/run.json"
exit $RC
"""
