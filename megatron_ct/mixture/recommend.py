"""From two fitted laws to a mixture: predicted curves over the domain ratio, the recommended
ratio, and how long training keeps paying off.

Everything here speaks in the *domain share* s of the training blend: the domain set's own
share is s, the general set's is 1 - s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from megatron_ct.mixture.law import LawParams

# Ratios the recommendation searches: a 1e-4 grid (cheap, and finer than any sweep).
SEARCH = np.linspace(0.0, 1.0, 10001)


@dataclass(frozen=True)
class SetLaw:
    """A validation set's fitted law and its role in the mixture."""

    name: str
    role: str  # 'domain' or 'general'
    params: LawParams

    def own_share(self, domain_share):
        s = np.asarray(domain_share, dtype=np.float64)
        return s if self.role == "domain" else 1.0 - s

    def loss(self, N: float, D: float, domain_share) -> np.ndarray:
        """Predicted loss at model size N after D tokens of a blend with this domain share."""
        return self.params.predict(N, D, self.own_share(domain_share))


@dataclass(frozen=True)
class Recommendation:
    objective: str
    """'constrained' (lowest domain loss with the general loss held) or 'weighted'."""
    ratio: float | None
    """Recommended domain share; None when no ratio meets the constraint."""
    domain_loss: float | None
    general_loss: float | None
    general_reference: float | None
    """Constrained: the general loss the regression is measured against."""
    general_limit: float | None
    """Constrained: the highest general loss allowed."""
    general_regression: float | None
    """general_loss / general_reference - 1 at the recommended ratio."""
    binding: bool
    """Constrained: the general-loss limit, not the domain loss itself, stopped the ratio."""
    note: str = ""


def _search(lo: float, hi: float) -> np.ndarray:
    """The grid inside [lo, hi] (both ends included)."""
    grid = SEARCH[(SEARCH >= lo - 1e-12) & (SEARCH <= hi + 1e-12)]
    return np.unique(np.concatenate([[lo], grid, [hi]]))


def recommend_constrained(
    domain: SetLaw,
    general: SetLaw,
    N: float,
    D: float,
    max_regression: float,
    general_base: float | None = None,
    search: tuple[float, float] = (0.0, 1.0),
) -> Recommendation:
    """The domain share in ``search`` that minimises the predicted domain loss while the general
    loss rises by at most ``max_regression`` (relative) over ``general_base``, or over the
    predicted general loss with no domain data (share 0) when no base is given."""
    ref = float(general.loss(N, D, 0.0)) if general_base is None else float(general_base)
    limit = ref * (1.0 + max_regression)
    grid = _search(*search)
    dom, gen = domain.loss(N, D, grid), general.loss(N, D, grid)
    ok = gen <= limit
    if not ok.any():
        return Recommendation(
            "constrained", None, None, None, ref, limit, None, True,
            note=f"no ratio keeps the general loss within {max_regression:.1%} of {ref:.4f} "
            f"(lowest predicted: {gen.min():.4f})",
        )  # fmt: skip
    i = int(np.flatnonzero(ok)[np.argmin(dom[ok])])
    # Binding: a ratio just past the feasible region would have lowered the domain loss.
    binding = bool((~ok).any() and dom[~ok].min() < dom[i])
    return Recommendation(
        "constrained",
        float(grid[i]),
        float(dom[i]),
        float(gen[i]),
        ref,
        limit,
        float(gen[i] / ref - 1.0),
        binding,
    )


def recommend_weighted(
    domain: SetLaw, general: SetLaw, N: float, D: float, weight: float, search: tuple[float, float] = (0.0, 1.0)
) -> Recommendation:
    """The domain share in ``search`` minimising ``weight * L_domain + (1 - weight) * L_general``."""
    grid = _search(*search)
    dom, gen = domain.loss(N, D, grid), general.loss(N, D, grid)
    i = int(np.argmin(weight * dom + (1.0 - weight) * gen))
    ref = float(general.loss(N, D, 0.0))
    return Recommendation(
        "weighted", float(grid[i]), float(dom[i]), float(gen[i]), ref, None, float(gen[i] / ref - 1.0), False
    )


def tokens_until_gain_below(law: SetLaw, domain_share: float, min_gain: float, window: float | None = None) -> float:
    """Tokens D after which the set's loss improves by less than ``min_gain`` (nats): per doubling
    of D (``window`` None) or per further ``window`` tokens. 0 when training never gains that much.

    Only the ``B*r^eta/D^beta`` term depends on D, so the gain is M*(D^-beta - (D')^-beta) with
    M = B*r^eta; per doubling this solves in closed form.
    """
    p = law.params
    r = float(law.own_share(domain_share))
    m = p.B * r**p.eta if r > 0 else 0.0
    if m <= 0 or p.beta <= 0:
        return 0.0
    if window is None:
        return (m * (1.0 - 2.0**-p.beta) / min_gain) ** (1.0 / p.beta)

    def gain(log_d: float) -> float:
        d = math.exp(log_d)
        return m * (d**-p.beta - (d + window) ** -p.beta) - min_gain

    from scipy.optimize import brentq

    lo, hi = 0.0, math.log(1e30)  # D from 1 token to 1e30
    if gain(lo) <= 0:
        return 0.0
    if gain(hi) > 0:
        return math.inf
    return math.exp(brentq(gain, lo, hi, xtol=1e-10))
