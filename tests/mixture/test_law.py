"""The D-CPT fit on observations drawn from known laws: recommended ratio, held-out predictions,
model-size extrapolation, the objective's gradient, the stop-tokens formula, refusals."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from mixture_synthetic import DOMAIN, GENERAL, RATIOS, TOKENS, observations, true_laws

from megatron_ct.errors import DataError
from megatron_ct.mixture.law import LawParams, _Objective, fit_law
from megatron_ct.mixture.observations import Observation
from megatron_ct.mixture.recommend import SetLaw, recommend_constrained, tokens_until_gain_below
from megatron_ct.mixture.report import FitOptions, fit_mixture

pytest.importorskip("scipy")
SEEDS = range(5)
TARGET = 2e9  # 4x beyond the largest observed token count


def as_observations(records: list[dict]) -> list[Observation]:
    return [
        Observation(r["ratio"], r["tokens"], r["params"], r["set"], r["loss"], f"{r['ratio']}/{r['params']}")
        for r in records
    ]


def arrays(records: list[dict], set_name: str, role: str):
    rows = [r for r in records if r["set"] == set_name]
    N, D, s, y = (np.array([r[k] for r in rows]) for k in ("params", "tokens", "ratio", "loss"))
    return N, D, (s if role == "domain" else 1 - s), y


@pytest.mark.parametrize("seed", SEEDS)
def test_fit_recovers_the_recommended_ratio(seed):
    """Fitted on noisy points, the recommendation (lowest domain loss with the general loss at
    most 2% above its ratio-0 value, at 4x the observed tokens) is the true one within 0.05."""
    opts = FitOptions(domain_set="zh", general_set="en", target_tokens=TARGET, holdout="none")
    report, _ = fit_mixture(as_observations(observations(seed)), opts)
    dom, gen = true_laws()
    truth = recommend_constrained(dom, gen, 1e8, TARGET, 0.02, search=(min(RATIOS), max(RATIOS)))
    assert 0.3 < truth.ratio < 0.7 and truth.binding  # the constraint decides: a real trade-off
    assert report["recommended_ratio"] == pytest.approx(truth.ratio, abs=0.05)
    assert report["recommendation"]["general_regression"] <= 0.02 + 1e-9


@pytest.mark.parametrize("seed", SEEDS)
def test_fit_predicts_held_out_points_within_2_percent(seed):
    """Fit without ratio 0.4 and without the 3 largest token counts; predict those points."""
    records = observations(seed)
    held = lambda r: r["ratio"] == 0.4 or r["tokens"] > TOKENS[6]  # noqa: E731
    for name, role in (("zh", "domain"), ("en", "general")):
        fit = fit_law(*arrays([r for r in records if not held(r)], name, role), name=name)
        N, D, r, y = arrays([r for r in records if held(r)], name, role)
        assert len(y) == len(TOKENS) + (len(RATIOS) - 1) * 3
        assert np.abs(fit.params.predict(N, D, r) / y - 1).max() < 0.02


def test_fit_json_reports_held_out_error_of_each_runs_last_point():
    opts = FitOptions(domain_set="zh", general_set="en", target_tokens=TARGET)
    report, _ = fit_mixture(as_observations(observations(0)), opts)
    for name in ("zh", "en"):
        held = report["sets"][name]["heldout"]
        assert held["points"] == len(RATIOS)  # one per run (series)
        assert held["max_rel_error"] < 0.02
        assert report["sets"][name]["fit"]["mean_rel_error"] < 0.005
    assert report["sets"]["zh"]["fitted"] == ["E", "B", "beta", "eta", "C", "gamma", "eps"]  # one size: no A, alpha
    assert report["sets"]["zh"]["params"]["A"] == 0.0
    assert len(report["predictions"]["ratio"]) == 101 and len(report["predictions"]["zh"]) == 101


def test_three_model_sizes_fit_the_size_term_and_extrapolate():
    dom = replace(DOMAIN, E=1.3, A=200.0, alpha=0.34)
    records = [r for r in observations(1, params=(1e7, 3e7, 1e8), laws=(dom, GENERAL)) if r["set"] == "zh"]
    fit = fit_law(*arrays(records, "zh", "domain"), name="zh")
    assert "A" in fit.fitted and "alpha" in fit.fitted
    grid = np.array(RATIOS[1:])
    assert np.abs(fit.params.predict(4e8, TARGET, grid) / dom.predict(4e8, TARGET, grid) - 1).max() < 0.02


def test_objective_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    n = 40
    logN, logD = rng.normal(0, 0.5, n), rng.normal(0, 1, n)
    r = rng.choice([0.0, 0.2, 0.5, 0.9], n)
    y = np.log(2 + rng.random(n))
    free = ("E", "A", "alpha", "B", "beta", "eta", "C", "gamma", "eps")
    obj = _Objective(logN, logD, r, y, free, {}, delta=0.05)
    x = np.array([0.5, -0.5, 0.3, 0.1, 0.4, 0.6, -1.0, 0.5, math.log(0.05)])
    _, grad = obj(x)
    h = 1e-6
    numeric = [(obj(x + h * e)[0] - obj(x - h * e)[0]) / (2 * h) for e in np.eye(len(x))]
    np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-8)


def test_stop_tokens_solve_the_gain_equation():
    law = SetLaw("zh", "domain", DOMAIN)
    loss = lambda d: float(law.loss(1e8, d, 0.5))  # noqa: E731
    d = tokens_until_gain_below(law, 0.5, 0.01)
    assert loss(d) - loss(2 * d) == pytest.approx(0.01, rel=1e-9)
    d = tokens_until_gain_below(law, 0.5, 0.001, window=1e9)
    assert loss(d) - loss(d + 1e9) == pytest.approx(0.001, rel=1e-6)
    assert tokens_until_gain_below(law, 0.0, 0.01) == 0.0  # no domain data: no gain from tokens


def test_constraint_against_a_given_base_loss():
    dom, gen = true_laws()
    base = float(gen.loss(1e8, TARGET, 0.0)) * 0.99  # e.g. the base model's general loss, measured
    rec = recommend_constrained(dom, gen, 1e8, TARGET, 0.02, general_base=base)
    assert rec.general_loss <= base * 1.02 < float(gen.loss(1e8, TARGET, rec.ratio + 1e-3))
    rec = recommend_constrained(dom, gen, 1e8, TARGET, 0.0, general_base=base * 0.9)
    assert rec.ratio is None and "no ratio keeps the general loss within" in rec.note


def test_law_without_domain_data_has_no_token_term():
    p = LawParams(E=1.0, A=0.0, alpha=0.0, B=5.0, beta=0.3, eta=0.0, C=0.1, gamma=0.5, eps=0.1)
    assert p.predict(1, [1e6, 1e9], 0.0).tolist() == pytest.approx([1.0 + 0.1 / 0.1**0.5] * 2)


@pytest.mark.parametrize(
    "ratios, eps, message",
    [
        ((0.1, 0.4, 0.7), None,
         "set 'zh': 3 distinct ratio(s) (0.1, 0.4, 0.7); fitting E, C, gamma and eps needs at least 4"),
        ((0.1, 0.7), 0.05, "set 'zh': 2 distinct ratio(s) (0.1, 0.7); fitting E, C and gamma needs at least 3"),
    ],
)  # fmt: skip
def test_too_few_ratios_are_refused(ratios, eps, message):
    records = observations(0, ratios=ratios)
    with pytest.raises(DataError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        fit_law(*arrays(records, "zh", "domain"), eps=eps, name="zh")
    if eps is None:  # a fixed eps makes three ratios enough
        fit_law(*arrays(records, "zh", "domain"), eps=0.05, name="zh")


def test_two_model_sizes_and_non_finite_losses_are_refused():
    records = observations(0, params=(1e7, 1e8))
    with pytest.raises(DataError, match="2 model sizes .* A/N\\^alpha needs at least 3"):
        fit_law(*arrays(records, "zh", "domain"), name="zh")
    N, D, r, y = arrays(observations(0), "zh", "domain")
    y[5] = np.nan
    with pytest.raises(DataError, match="set 'zh': loss nan at ratio .* is not finite"):
        fit_law(N, D, r, y, name="zh")
