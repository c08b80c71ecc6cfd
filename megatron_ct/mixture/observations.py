"""Observations for the D-CPT fit: (domain ratio, tokens, params, set, loss) points.

Two sources:

- proxy-run directories (what tools/sweep_mixture.py makes, or any pretrain_ct.py run):
  ``config.yaml`` gives the blend, hence the domain ratio, the batch shape, hence the tokens
  at each evaluation, and the model, hence N; ``eval.jsonl`` (the trainer's validation
  records) gives a loss per set and iteration. ``mixture_point.json``, written by the sweep,
  names the domain/general datasets and the swept stages;
- a JSON-lines file, one ``{"ratio": r, "tokens": D, "params": N, "set": name, "loss": x}``
  per line (``params`` may be left out when every point has the same model).

``ratio`` is always the domain share of the training blend; the fit turns it into each set's
own share. Points at 0 tokens (a base-line evaluation before training) carry no information
about the ``D^-beta`` term and are skipped.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

from megatron_ct.errors import ConfigError, DataError
from megatron_ct.families import family_of

POINT_FILE = "mixture_point.json"
SWEEP_FILE = "sweep.json"


@dataclass(frozen=True)
class Observation:
    ratio: float
    """Domain share of the training blend, in [0, 1]."""
    tokens: float
    """Training tokens at the evaluation, counted from the start of the mixture (D)."""
    params: float | None
    """Model parameters (N); None when the source does not say (one model size assumed)."""
    set: str
    """Validation set name."""
    loss: float
    """Validation loss per token (nats)."""
    series: str
    """One proxy run (its directory, or ratio/params for a file): the held-out split works per series."""


@dataclass(frozen=True)
class RunInfo:
    """What a proxy-run directory says about its mixture."""

    path: str
    ratio: float
    params: int
    tokens_per_iter: int
    start_iter: int
    """Steps before the first swept stage (their tokens are not at ratio r)."""
    end_iter: int | None
    """Last step of the last swept stage when later stages follow (evaluations after it are
    not at ratio r); None: the swept stages run to the end."""
    domain: dict[str, float]
    """Domain datasets and their share of the blend (summing to ``ratio``)."""
    general: dict[str, float]
    """General datasets and their share (summing to 1 - ``ratio``)."""


def swept_span(names: list[str], stages: list[str], where: str) -> tuple[int, int]:
    """Indices of the first and last swept stage; they must be consecutive (D counts the tokens
    from the first one's start)."""
    for s in stages:
        if s not in names:
            raise ConfigError(f"--stage {s}: no such stage in {where} (stages: {', '.join(names)})")
    idx = sorted(names.index(s) for s in stages)
    if idx != list(range(idx[0], idx[-1] + 1)):
        raise ConfigError(f"--stage {','.join(stages)}: swept stages must follow one another in {where}")
    return idx[0], idx[-1]


def read_observations(path: str) -> list[Observation]:
    """The ``--observations`` JSON-lines file."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: observations file not found")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"{where}: not a JSON line") from None
            if not isinstance(rec, dict):
                raise DataError(f"{where}: expected an object with ratio, tokens, params, set, loss")
            missing = [k for k in ("ratio", "tokens", "set", "loss") if k not in rec]
            if missing:
                raise DataError(f"{where}: missing {', '.join(missing)} (expected ratio, tokens, params, set, loss)")
            ratio, tokens, loss = (_number(rec[k], f"{where}: {k}") for k in ("ratio", "tokens", "loss"))
            params = rec.get("params")
            params = None if params is None else _number(params, f"{where}: params")
            if not 0 <= ratio <= 1:
                raise DataError(f"{where}: ratio: expected the domain share in [0, 1], got {ratio}")
            if tokens < 0 or (params is not None and params <= 0):
                raise DataError(f"{where}: expected tokens >= 0 and params > 0")
            if not math.isfinite(loss):
                raise DataError(f"{where}: loss is {loss} (non-finite); drop that point or its run")
            if tokens == 0:
                continue  # a base-line evaluation: no tokens seen at the mixture yet
            series = f"ratio={ratio:g},params={params}"
            out.append(Observation(ratio, tokens, params, str(rec["set"]), loss, series))
    if not out:
        raise DataError(f"{path}: no observations (expected JSON lines with ratio, tokens, params, set, loss)")
    return out


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{what}: expected a number, got {value!r}")
    return float(value)


def run_info(path: str, domain: list[str] | None = None, stages: list[str] | None = None) -> tuple[RunInfo, object]:
    """Read a run directory's ``config.yaml`` (and ``mixture_point.json`` when the sweep wrote
    it): its domain ratio, model size and token accounting. ``domain``/``stages`` name the
    domain datasets and swept stages for runs the sweep did not make."""
    from megatron_ct.config import load_config
    from megatron_ct.config.schedule import stage_iters, stage_seq_lengths

    cfg_path = os.path.join(path, "config.yaml")
    if not os.path.isfile(cfg_path):
        raise DataError(f"{path}: no config.yaml (expected a proxy-run directory written by tools/sweep_mixture.py)")
    try:
        cfg = load_config(cfg_path)
    except ConfigError as e:
        raise DataError(f"{cfg_path}: {e}") from None
    point = {}
    point_path = os.path.join(path, POINT_FILE)
    if os.path.isfile(point_path):
        with open(point_path, encoding="utf-8") as f:
            point = json.load(f)
        domain = domain or point.get("domain")
        stages = stages or point.get("stages")
    if not domain:
        raise DataError(f"{path}: no {POINT_FILE}; name the domain datasets (--domain-data) to read its ratio")
    if cfg.data.source != "indexed":
        raise DataError(f"{cfg_path}: data.source is {cfg.data.source!r}; a proxy run trains on a blend of datasets")
    names = [s.name for s in cfg.data.stages]
    stages = list(stages or names)
    try:
        first, last = swept_span(names, stages, cfg_path)
    except ConfigError as e:
        raise DataError(str(e)) from None
    shares = []
    for stage in cfg.data.stages:
        if stage.name not in stages:
            continue
        if stage.end_blend is not None:
            raise DataError(f"{cfg_path}: stage {stage.name!r} ramps its blend (end_blend); the ratio must be constant")
        total = sum(stage.blend.values())
        shares.append({k: w / total for k, w in stage.blend.items()})
    ratios = {round(sum(s.get(d, 0.0) for d in domain), 9) for s in shares}
    if len(ratios) != 1:
        raise DataError(f"{cfg_path}: stages {', '.join(stages)} have different domain shares {sorted(ratios)}")
    ratio = ratios.pop()
    if "ratio" in point and abs(point["ratio"] - ratio) > 1e-6:
        raise DataError(f"{path}: config.yaml gives domain ratio {ratio:g} but {POINT_FILE} says {point['ratio']:g}")
    lengths = sorted(set(stage_seq_lengths(cfg.data)[first : last + 1]))
    if len(lengths) != 1:
        raise DataError(f"{cfg_path}: stages {', '.join(stages)} have different sequence lengths {lengths}")
    iters = stage_iters(cfg.data, cfg.train.global_batch_size)
    start = sum(iters[:first])  # only the last stage can be open-ended (None)
    end = sum(iters[: last + 1]) if last < len(names) - 1 else None
    blend = shares[0]
    info = RunInfo(
        path=path,
        ratio=ratio,
        params=family_of(cfg.model).num_parameters(cfg.model),
        tokens_per_iter=cfg.train.global_batch_size * lengths[0],
        start_iter=start,
        end_iter=end,
        domain={k: w for k, w in blend.items() if k in domain},
        general={k: w for k, w in blend.items() if k not in domain},
    )
    return info, cfg


def read_run(
    path: str, domain: list[str] | None = None, stages: list[str] | None = None
) -> tuple[list[Observation], RunInfo]:
    """One proxy run's evaluations as observations (the last record wins for a repeated
    (iteration, set), as after a resumed run), and what the run says about its mixture."""
    info, cfg = run_info(path, domain, stages)
    candidates = [os.path.join(path, "eval.jsonl")]
    for d in (cfg.logging.log_dir, cfg.checkpoint.save):
        if d:
            candidates.append(os.path.join(d, "eval.jsonl"))
    eval_path = next((c for c in candidates if os.path.isfile(c)), None)
    if eval_path is None:
        raise DataError(
            f"{path}: no eval.jsonl (has the run finished? it needs data.valid sets and data.eval_interval)"
        )
    records: dict[tuple[int, str], tuple[float, str]] = {}
    with open(eval_path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                key = (int(rec["iteration"]), str(rec["set"]))
                loss = float(rec["loss"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise DataError(f"{eval_path}:{n}: expected an eval record with iteration, set, loss") from None
            records[key] = (loss, f"{eval_path}:{n}")
    out = []
    for (iteration, name), (loss, where) in sorted(records.items()):
        tokens = (iteration - info.start_iter) * info.tokens_per_iter
        if tokens <= 0 or (info.end_iter is not None and iteration > info.end_iter):
            continue  # before the mixture started (or the base-line evaluation), or after it
        if not math.isfinite(loss):
            raise DataError(f"{where}: loss is {loss} (set {name!r}, iteration {iteration}); drop run {path}")
        out.append(Observation(info.ratio, float(tokens), float(info.params), name, loss, os.path.normpath(path)))
    if not out:
        raise DataError(f"{eval_path}: no evaluation after the mixture started (iteration > {info.start_iter})")
    return out, info


def run_dirs(path: str) -> list[str]:
    """A run directory itself, or the run directories of a sweep directory."""
    if os.path.isfile(os.path.join(path, "config.yaml")):
        return [path]
    sweep = os.path.join(path, SWEEP_FILE)
    if os.path.isfile(sweep):
        with open(sweep, encoding="utf-8") as f:
            points = json.load(f)["points"]
        return [os.path.join(path, p["name"]) for p in points]
    if os.path.isdir(path):
        found = sorted(
            os.path.join(path, d) for d in os.listdir(path) if os.path.isfile(os.path.join(path, d, "config.yaml"))
        )
        if found:
            return found
    raise DataError(f"{path}: not a proxy-run directory (config.yaml) or a sweep directory ({SWEEP_FILE})")


def collect(
    paths: list[str], observations: str | None = None, domain: list[str] | None = None, stages: list[str] | None = None
) -> tuple[list[Observation], list[RunInfo]]:
    """Observations from run/sweep directories and an observations file; plus the runs' info."""
    out: list[Observation] = []
    infos: list[RunInfo] = []
    for p in paths:
        for run in run_dirs(p):
            obs, info = read_run(run, domain, stages)
            out += obs
            infos.append(info)
    if observations:
        out += read_observations(observations)
    if not out:
        raise DataError("no observations: give proxy-run or sweep directories, or --observations FILE")
    sizes = {o.params for o in out}
    if None in sizes and len(sizes) > 1:
        raise DataError("some observations give params and some do not; give params everywhere or nowhere")
    return out, infos
