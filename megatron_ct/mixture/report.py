"""Fit both sets, check the fit on held-out points, recommend, and write fit.json and fit.png.

``fit_mixture`` is what tools/fit_mixture.py runs; its result is the content of ``fit.json``:

- ``sets.<name>``: role, fitted parameters (and which were fitted), points, Huber objective,
  relative error on the fitted points and on held-out points (each run's last evaluation,
  predicted by a fit that did not see it);
- ``target``: the budget predictions are made for (tokens, params);
- ``predictions``: both sets' predicted losses over the domain ratio 0, 0.01, ..., 1 at the target;
- ``recommendation`` and ``recommended_ratio``; ``blend`` (dataset weights) when dataset names
  are known; ``stop_tokens``: the tokens after which the domain loss gains less than asked.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

import numpy as np

from megatron_ct.errors import DataError
from megatron_ct.mixture.law import FORMULA, HUBER_DELTA, STARTS, fit_law
from megatron_ct.mixture.observations import Observation, RunInfo
from megatron_ct.mixture.recommend import SetLaw, recommend_constrained, recommend_weighted, tokens_until_gain_below

PREDICTION_GRID = np.round(np.linspace(0.0, 1.0, 101), 2)


@dataclass(kw_only=True)
class FitOptions:
    domain_set: str
    """Validation set measuring the domain (its own share is the domain ratio)."""
    general_set: str
    """Validation set measuring general ability (its own share is 1 - domain ratio)."""
    target_tokens: float | None = None
    """Budget the recommendation is for; None: the largest observed token count."""
    target_params: float | None = None
    """Model size the recommendation is for; None: the observed size (the largest of several)."""
    objective: str = "constrained"
    """'constrained' or 'weighted' (see recommend.py)."""
    max_general_regression: float = 0.02
    """Constrained: largest allowed relative rise of the general loss."""
    general_base_loss: float | None = None
    """Constrained: the general loss to measure the rise against; None: predicted at ratio 0."""
    domain_weight: float = 0.5
    """Weighted: weight of the domain loss (the general loss gets 1 - this)."""
    min_gain: float = 0.01
    """stop_tokens: the domain-loss gain (nats) below which more tokens stop paying off."""
    gain_window: float | None = None
    """stop_tokens: gain per this many more tokens; None: per doubling of the tokens."""
    eps: float | None = None
    """Fixed eps of the law; None fits it."""
    ratio_range: tuple[float, float] | None = None
    """Domain shares the recommendation may pick from; None: the observed ratios' range (the
    law is not trusted to extrapolate in r)."""
    holdout: str = "last"
    """'last': each run's last evaluation is held out to measure prediction error; 'none'."""
    domain_data: list[str] | None = None
    """Domain dataset names, for the blend (read from the sweep's runs when not given)."""
    general_data: list[str] | None = None
    """General dataset names, for the blend."""


def _arrays(obs: list[Observation], role: str) -> tuple[np.ndarray, ...]:
    N = np.array([o.params if o.params is not None else 1.0 for o in obs])
    D = np.array([o.tokens for o in obs])
    s = np.array([o.ratio for o in obs])
    r = s if role == "domain" else 1.0 - s
    return N, D, r, np.array([o.loss for o in obs])


def _rel_error(params, obs: list[Observation], role: str) -> dict:
    N, D, r, loss = _arrays(obs, role)
    err = np.abs(params.predict(N, D, r) / loss - 1.0)
    return {"points": len(obs), "mean_rel_error": float(err.mean()), "max_rel_error": float(err.max())}


def split_last(obs: list[Observation]) -> tuple[list[Observation], list[Observation]]:
    """(fit points, held-out points): each series' largest-token point is held out when the
    series has at least 3 points."""
    by_series: dict[str, list[Observation]] = {}
    for o in obs:
        by_series.setdefault(o.series, []).append(o)
    fit, held = [], []
    for points in by_series.values():
        points = sorted(points, key=lambda o: o.tokens)
        if len(points) >= 3:
            fit += points[:-1]
            held.append(points[-1])
        else:
            fit += points
    return fit, held


def fit_set(name: str, role: str, obs: list[Observation], opts: FitOptions) -> tuple[SetLaw, dict]:
    """Fit one set; its fit.json entry (with the held-out check)."""
    heldout: dict = {"points": 0}
    if opts.holdout == "last":
        fit_part, held = split_last(obs)
        if held:
            try:
                pre = fit_law(*_arrays(fit_part, role), eps=opts.eps, name=name)
                heldout = _rel_error(pre.params, held, role)
            except DataError as e:
                heldout["note"] = f"not enough points to hold any out ({e})"
        else:
            heldout["note"] = "no run has 3 or more evaluations to hold one out"
    result = fit_law(*_arrays(obs, role), eps=opts.eps, name=name)
    entry = {
        "role": role,
        "params": result.params.to_dict(),
        "fitted": list(result.fitted),
        "points": result.points,
        "huber_objective": result.objective,
        "fit": _rel_error(result.params, obs, role),
        "heldout": heldout,
    }
    return SetLaw(name, role, result.params), entry


def _target(obs: list[Observation], opts: FitOptions) -> tuple[float, float | None]:
    sizes = sorted({o.params for o in obs if o.params is not None})
    if opts.target_params is not None:
        if len(sizes) == 1 and opts.target_params != sizes[0]:
            raise DataError(
                f"--target-params {opts.target_params:g}: the runs have one model size ({sizes[0]:g}), which "
                "cannot predict another; sweep at least 3 sizes (--model) or leave --target-params out"
            )
        if not sizes:
            raise DataError("--target-params: the observations give no params; the fit cannot predict other sizes")
    params = opts.target_params if opts.target_params is not None else (sizes[-1] if sizes else None)
    tokens = opts.target_tokens if opts.target_tokens is not None else max(o.tokens for o in obs)
    return float(tokens), params


def _blend(ratio: float, runs: list[RunInfo], opts: FitOptions) -> dict[str, float] | None:
    """Dataset weights for a domain share: the runs' split inside each group, or an equal split."""
    if opts.domain_data and opts.general_data:
        dom = {d: 1.0 for d in opts.domain_data}
        gen = {g: 1.0 for g in opts.general_data}
    elif runs:
        # The split inside a group is the same in every point of a sweep; take a run that has both groups.
        info = max(runs, key=lambda i: min(i.ratio, 1 - i.ratio))
        dom, gen = info.domain, info.general
        if not sum(dom.values()) or not sum(gen.values()):
            return None
    else:
        return None
    out = {k: ratio * w / sum(dom.values()) for k, w in dom.items()}
    out.update({k: (1.0 - ratio) * w / sum(gen.values()) for k, w in gen.items()})
    return {k: round(v, 6) for k, v in out.items()}


def fit_mixture(
    obs: list[Observation], opts: FitOptions, runs: list[RunInfo] = (), sources: list[str] = ()
) -> tuple[dict, dict[str, SetLaw]]:
    """Fit both sets and recommend; returns (fit.json content, laws by set name)."""
    runs = list(runs)
    found = sorted({o.set for o in obs})
    for flag, name in (("--domain-set", opts.domain_set), ("--general-set", opts.general_set)):
        if name not in found:
            raise DataError(f"{flag} {name}: no observations of set {name!r} (sets found: {', '.join(found)})")
    if opts.domain_set == opts.general_set:
        raise DataError(f"--domain-set and --general-set are both {opts.domain_set!r}; name two validation sets")
    laws, sets = {}, {}
    for name, role in ((opts.domain_set, "domain"), (opts.general_set, "general")):
        laws[name], sets[name] = fit_set(name, role, [o for o in obs if o.set == name], opts)
    dom, gen = laws[opts.domain_set], laws[opts.general_set]
    tokens, params = _target(obs, opts)
    N = params if params is not None else 1.0
    used = [o for o in obs if o.set in laws]
    search = opts.ratio_range or (min(o.ratio for o in used), max(o.ratio for o in used))
    if opts.objective == "weighted":
        rec = recommend_weighted(dom, gen, N, tokens, opts.domain_weight, search)
    else:
        rec = recommend_constrained(dom, gen, N, tokens, opts.max_general_regression, opts.general_base_loss, search)
    report = {
        "law": FORMULA,
        "ratio": "domain share of the training blend; each set's law uses its own share "
        "(domain set: ratio, general set: 1 - ratio)",
        "inputs": {
            "sources": list(sources),
            "points": len(used),
            "ratios": sorted({o.ratio for o in used}),
            "params": sorted({o.params for o in used if o.params is not None}),
            "tokens": [min(o.tokens for o in used), max(o.tokens for o in used)],
        },
        "settings": {
            "huber_delta": HUBER_DELTA,
            "lbfgs_starts": STARTS,
            "eps": "fitted" if opts.eps is None else opts.eps,
            "holdout": opts.holdout,
            "single_size": len({o.params for o in used}) == 1,
        },
        "sets": sets,
        "target": {"tokens": tokens, "params": params},
        "predictions": {
            "ratio": PREDICTION_GRID.tolist(),
            **{name: law.loss(N, tokens, PREDICTION_GRID).tolist() for name, law in laws.items()},
        },
        "recommendation": {
            **asdict(rec),
            "search_range": list(search),
            **(
                {"max_general_regression": opts.max_general_regression}
                if opts.objective == "constrained"
                else {"domain_weight": opts.domain_weight}
            ),
            "general_reference_from": "--general-base-loss"
            if opts.general_base_loss is not None and opts.objective == "constrained"
            else "predicted general loss at ratio 0",
        },
        "recommended_ratio": rec.ratio,
        "blend": _blend(rec.ratio, runs, opts) if rec.ratio is not None else None,
        "stop_tokens": None,
    }
    if rec.ratio is not None:
        stop = tokens_until_gain_below(dom, rec.ratio, opts.min_gain, opts.gain_window)
        report["stop_tokens"] = {
            "set": dom.name,
            "ratio": rec.ratio,
            "min_gain": opts.min_gain,
            "per": "doubling of tokens" if opts.gain_window is None else f"{opts.gain_window:g} more tokens",
            "tokens": stop if math.isfinite(stop) else None,
        }
    return report, laws


def write_text(path: str, text: str) -> None:
    """Write through a temporary name, so a crash never leaves a half-written file."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: str, content: dict) -> None:
    write_text(path, json.dumps(content, indent=2) + "\n")


def stage_block(report: dict, name: str = "mixture") -> str:
    """A curriculum stage (YAML list item) training the recommended blend for the target tokens."""
    blend = report.get("blend")
    if report["recommended_ratio"] is None:
        raise DataError(f"--emit-stage: no recommended ratio ({report['recommendation']['note']})")
    if not blend:
        raise DataError(
            "--emit-stage: dataset names unknown; fit proxy-run directories or give --domain-data and --general-data"
        )
    weights = ", ".join(f"{k}: {v:g}" for k, v in blend.items())
    return (
        f"# D-CPT recommendation: domain share {report['recommended_ratio']:g} "
        f"for {report['target']['tokens']:.4g} tokens (tools/fit_mixture.py)\n"
        f"- name: {name}\n"
        f"  tokens: {int(round(report['target']['tokens']))}\n"
        f"  blend: {{{weights}}}\n"
    )


def plot_fit(report: dict, laws: dict[str, SetLaw], obs: list[Observation], path: str) -> str:
    """fit.png: each set's observed losses and fitted curves over tokens, per ratio; and both
    sets' predicted losses over the ratio at the target budget with the recommendation."""
    from megatron_ct.plotting import pyplot, save_png

    plt = pyplot()

    tokens, params = report["target"]["tokens"], report["target"]["params"]
    N = params if params is not None else 1.0
    rec = report["recommended_ratio"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    ratios = sorted({o.ratio for o in obs if o.set in laws})
    cmap = plt.get_cmap("viridis")
    for ax, (name, law) in zip(axes[:2], laws.items(), strict=True):
        points = [o for o in obs if o.set == name and (o.params or 1.0) == N]
        lo = min(o.tokens for o in points) if points else tokens / 10
        grid = np.geomspace(lo, max(tokens, max((o.tokens for o in points), default=lo)), 200)
        for k, ratio in enumerate(ratios):
            color = cmap(k / max(len(ratios) - 1, 1))
            mine = [o for o in points if o.ratio == ratio]
            ax.scatter([o.tokens for o in mine], [o.loss for o in mine], s=14, color=color)
            ax.plot(grid, law.loss(N, grid, ratio), color=color, lw=1, label=f"ratio {ratio:g}")
        if rec is not None:
            ax.plot(grid, law.loss(N, grid, rec), color="crimson", lw=1.6, ls="--", label=f"recommended {rec:g}")
        ax.axvline(tokens, color="gray", ls=":", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("training tokens at the mixture (D)")
        ax.set_ylabel("validation loss (nats/token)")
        err = report["sets"][name]["heldout"].get("mean_rel_error")
        ax.set_title(f"{law.role} set '{name}'" + (f" (held-out error {err:.2%})" if err is not None else ""))
        ax.legend(fontsize=7, loc="upper right")
    # Domain loss on the left axis, general loss on the right: their scales differ.
    ax = axes[2]
    r = report["recommendation"]
    lo, hi = r["search_range"]
    ax.axvspan(lo, hi, color="0.93", zorder=0, label="ratios searched")
    grid = np.linspace(0, 1, 401)
    inside = (grid >= lo) & (grid <= hi)
    handles = []
    role = {law.role: law for law in laws.values()}
    for axis, law, color in ((ax, role["domain"], "tab:blue"), (ax.twinx(), role["general"], "tab:orange")):
        pred = law.loss(N, tokens, grid)
        handles += axis.plot(grid, pred, color=color, label=f"{law.role} '{law.name}'")
        axis.set_ylabel(f"{law.role} loss at {tokens:.3g} tokens", color=color)
        # The law diverges towards r = 0 outside the data; scale to the searched range.
        span = pred[inside]
        pad = 0.05 * (span.max() - span.min() + 1e-3)
        axis.set_ylim(span.min() - pad, span.max() + pad)
        if law.role == "general" and r.get("general_limit") is not None:
            handles.append(axis.axhline(r["general_limit"], color=color, ls=":", lw=1, label="general-loss limit"))
    if rec is not None:
        handles.append(ax.axvline(rec, color="crimson", ls="--", lw=1.2, label=f"recommended ratio {rec:g}"))
    ax.set_xlabel("domain share of the blend")
    ax.set_title("prediction at the target budget")
    ax.legend(handles=handles, fontsize=7, loc="upper center")
    fig.tight_layout()
    return save_png(fig, path, dpi=110)
