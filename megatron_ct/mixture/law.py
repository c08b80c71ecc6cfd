"""The D-CPT law and its fit (Que et al. 2024, arXiv 2406.01375, the paper's preferred form).

    L(N, D, r) = E + A / N^alpha + B * r^eta / D^beta + C / (r + eps)^gamma

N: model parameters, D: training tokens seen at the set's mixture, r: the share of the
validation set's own corpus in the training blend (the domain share for the domain set,
1 - domain share for the general set). With one model size the ``A / N^alpha`` term is a
constant and folds into E (A = 0).

Fitting follows the paper (after Hoffmann et al.'s Chinchilla fit): minimise the Huber loss
(delta 1e-3) of ``log L_pred - log L_obs`` with L-BFGS from several initialisations and keep
the best. Scales are fitted as logarithms (E = exp(e), ...) so they stay positive, and
``log L_pred`` is a log-sum-exp of the four terms, which keeps the gradient exact and finite.
The initialisations are a grid over the exponents (and eps); at each grid point the scales
(E, A, B, C), in which the law is linear, come from non-negative least squares, and L-BFGS
starts from the best few. Tokens and parameters are divided by their geometric mean during
the fit (conditioning) and the scales converted back afterwards.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np

from megatron_ct.errors import DataError

FORMULA = "L(N, D, r) = E + A/N^alpha + B*r^eta/D^beta + C/(r + eps)^gamma"
HUBER_DELTA = 1e-3

# Exponent bounds: a power law's exponent is non-negative here (more data or more of a
# set's own corpus never raises its loss); the upper bounds only keep L-BFGS out of overflow.
BOUNDS = {"alpha": (0.0, 3.0), "beta": (0.0, 3.0), "eta": (0.0, 5.0), "gamma": (0.0, 5.0), "eps": (1e-4, 10.0)}
# Initialisation grid over the non-linear parameters.
GRID = {
    "alpha": (0.1, 0.3, 0.6),
    "beta": (0.05, 0.15, 0.3, 0.6, 1.0),
    "eta": (0.0, 0.3, 0.7, 1.5),
    "gamma": (0.1, 0.3, 0.7, 1.5),
    "eps": (0.005, 0.03, 0.1, 0.3),
}
STARTS = 8  # L-BFGS runs, from the best grid points


@dataclass(frozen=True)
class LawParams:
    """Parameters of one validation set's law, in the units of the data (tokens, parameters)."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float
    eta: float
    C: float
    gamma: float
    eps: float

    def predict(self, N, D, r) -> np.ndarray:
        """Loss at model size N, tokens D, own-corpus share r (arrays broadcast)."""
        N, D, r = (np.asarray(x, dtype=np.float64) for x in (N, D, r))
        size = self.A / N**self.alpha if self.A > 0 else 0.0
        with np.errstate(divide="ignore"):
            data = np.where(r > 0, self.B * np.power(np.maximum(r, 0.0), self.eta) / D**self.beta, 0.0)
        return self.E + size + data + self.C / (r + self.eps) ** self.gamma

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LawParams:
        return cls(**{k: float(d[k]) for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class FitResult:
    params: LawParams
    fitted: tuple[str, ...]
    """Names of the parameters the fit chose (the rest are fixed: A=alpha=0 for one size, a given eps)."""
    objective: float
    """Mean Huber loss of the log residuals at the optimum."""
    starts: int
    """L-BFGS runs made."""
    points: int


def required_ratios(fit_eps: bool) -> int:
    """Distinct ratios a set needs: the D-free part of the law, E + C/(r+eps)^gamma, is seen
    once per ratio, so E, C, gamma (and eps when fitted) need that many distinct values."""
    return 4 if fit_eps else 3


def check_fittable(name: str, N, D, r, loss, fit_eps: bool) -> None:
    """Refuse, in one line, a set whose points cannot determine the law's parameters."""
    N, D, r, loss = (np.asarray(x, dtype=np.float64) for x in (N, D, r, loss))
    bad = ~np.isfinite(loss)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"set {name!r}: loss {loss[i]} at ratio {r[i]:g}, tokens {D[i]:g} is not finite; drop that run")
    if (loss <= 0).any():
        raise DataError(f"set {name!r}: losses must be > 0 (the fit works on log loss), got {loss.min():g}")
    if ((r < 0) | (r > 1)).any() or (D <= 0).any() or (N <= 0).any():
        raise DataError(f"set {name!r}: expected ratios in [0, 1], tokens > 0 and params > 0")
    ratios = sorted(set(np.round(r, 9).tolist()))
    need = required_ratios(fit_eps)
    if len(ratios) < need:
        what = "E, C, gamma and eps" if fit_eps else "E, C and gamma"
        hint = "; sweep more ratios" + (" or fix eps with --eps VALUE" if fit_eps else "")
        raise DataError(
            f"set {name!r}: {len(ratios)} distinct ratio(s) ({', '.join(f'{x:g}' for x in ratios)}); "
            f"fitting {what} needs at least {need}{hint}"
        )
    tokens = sorted(set(D.tolist()))
    if len(tokens) < 3:
        raise DataError(
            f"set {name!r}: {len(tokens)} distinct token count(s); B, beta and eta need at least 3 "
            "(evaluate each proxy run more often: data.eval_interval)"
        )
    sizes = sorted(set(N.tolist()))
    if len(sizes) == 2:
        raise DataError(
            f"set {name!r}: 2 model sizes ({sizes[0]:g}, {sizes[1]:g}); A/N^alpha needs at least 3 "
            "(or use one size, where it folds into E)"
        )
    n_params = len(free_names(len(sizes) > 1, fit_eps))
    if len(loss) <= n_params:
        raise DataError(f"set {name!r}: {len(loss)} points for {n_params} parameters; need more evaluations")


def free_names(fit_size: bool, fit_eps: bool) -> tuple[str, ...]:
    names = ["E"] + (["A", "alpha"] if fit_size else []) + ["B", "beta", "eta", "C", "gamma"]
    return tuple(names + (["eps"] if fit_eps else []))


class _Objective:
    """Mean Huber loss of log residuals and its exact gradient, over the free parameters.

    Internal vector (in ``names`` order): e, a, alpha, b, beta, eta, c, gamma, log_eps, with
    E = exp(e) etc. and N, D divided by their reference scales.
    """

    ALL = ("E", "A", "alpha", "B", "beta", "eta", "C", "gamma", "eps")

    def __init__(self, logN, logD, r, log_loss, free: tuple[str, ...], fixed: dict[str, float], delta: float):
        self.logN, self.logD, self.r, self.y = logN, logD, r, log_loss
        # log r with 0 where r = 0: there the D term is absent (no own data, no gain from D),
        # whatever eta is, so it is masked rather than computed as eta * -inf.
        self.log_r0 = np.log(np.where(r > 0, r, 1.0))
        self.free, self.fixed, self.delta = free, fixed, delta
        self.index = {name: i for i, name in enumerate(free)}

    def full(self, x: np.ndarray) -> dict[str, float]:
        v = dict(self.fixed)
        v.update({name: float(x[i]) for i, name in enumerate(self.free)})
        return v

    def terms(self, v: dict[str, float]) -> np.ndarray:
        """The law's four terms in log space: [4, points]; -inf for an absent term."""
        n = len(self.y)
        eps = math.exp(v["eps"])
        size = v["A"] - v["alpha"] * self.logN if "A" in self.free else np.full(n, -np.inf)
        data = np.where(self.r > 0, v["B"] + v["eta"] * self.log_r0 - v["beta"] * self.logD, -np.inf)
        ratio = v["C"] - v["gamma"] * np.log(self.r + eps)
        return np.stack([np.full(n, v["E"]), size, data, ratio])

    def __call__(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        v = self.full(x)
        t = self.terms(v)  # [4, n]
        top = t.max(axis=0)
        w = np.exp(t - top)
        pred = top + np.log(w.sum(axis=0))  # log-sum-exp: log L_pred, [n]
        w /= w.sum(axis=0)  # d log L_pred / d term_k
        res = pred - self.y
        d = self.delta
        huber = np.where(np.abs(res) <= d, 0.5 * res**2, d * (np.abs(res) - 0.5 * d))
        dres = np.clip(res, -d, d) / len(res)  # d mean Huber / d residual
        eps = math.exp(v["eps"])
        partial = {
            "E": w[0],
            "A": w[1],
            "alpha": -w[1] * self.logN,
            "B": w[2],
            "beta": -w[2] * self.logD,
            "eta": w[2] * self.log_r0,
            "C": w[3],
            "gamma": -w[3] * np.log(self.r + eps),
            "eps": -w[3] * v["gamma"] * eps / (self.r + eps),
        }
        grad = np.array([float(np.dot(dres, partial[name])) for name in self.free])
        # Scaled by 1/delta so L-BFGS's absolute tolerances suit the objective's size.
        return float(huber.mean()) / d, grad / d


def _bounds(free: tuple[str, ...]) -> list[tuple[float | None, float | None]]:
    out = []
    for name in free:
        if name == "eps":
            lo, hi = BOUNDS["eps"]
            out.append((math.log(lo), math.log(hi)))
        elif name in BOUNDS:
            out.append(BOUNDS[name])
        else:
            out.append((-50.0, 50.0))  # log scales
    return out


def _nnls_start(obj: _Objective, expo: dict[str, float], loss: np.ndarray) -> dict[str, float] | None:
    """Scales E, A, B, C for fixed exponents: non-negative least squares on the relative error."""
    from scipy.optimize import nnls

    eps = math.exp(expo["eps"])
    cols = [np.ones_like(loss)]
    if "A" in obj.free:
        cols.append(np.exp(-expo["alpha"] * obj.logN))
    cols.append(np.where(obj.r > 0, np.exp(expo["eta"] * obj.log_r0 - expo["beta"] * obj.logD), 0.0))
    cols.append((obj.r + eps) ** -expo["gamma"])
    M = np.stack(cols, axis=1) / loss[:, None]  # relative residuals, [n, k]
    coef, _ = nnls(M, np.ones_like(loss))
    floor = 1e-6 * float(loss.mean())  # a zero scale would be log(0); keep it tiny instead
    coef = np.maximum(coef, floor)
    names = ["E"] + (["A"] if "A" in obj.free else []) + ["B", "C"]
    start = dict(expo)
    start.update({n: math.log(c) for n, c in zip(names, coef, strict=True)})
    return start


def _one_blas_thread():
    """L-BFGS-B's linear algebra is on 9x9 matrices: BLAS threads only add synchronisation,
    which costs 10x on a busy machine. threadpoolctl limits them when installed."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def fit_law(N, D, r, loss, *, eps: float | None = None, name: str = "set", delta: float = HUBER_DELTA) -> FitResult:
    """Fit one set's law to points (N, D, r, loss). ``eps=None`` fits eps, a number fixes it.

    Refuses (DataError) points that cannot determine the parameters; see :func:`check_fittable`.
    """
    with _one_blas_thread():
        return _fit_law(N, D, r, loss, eps, name, delta)


def _fit_law(N, D, r, loss, eps: float | None, name: str, delta: float) -> FitResult:
    from scipy.optimize import minimize

    N, D, r, loss = (np.asarray(x, dtype=np.float64).ravel() for x in (N, D, r, loss))
    fit_eps = eps is None
    check_fittable(name, N, D, r, loss, fit_eps)
    fit_size = len(set(N.tolist())) > 1
    free = free_names(fit_size, fit_eps)
    # Reference scales: the fit sees N/N0 and D/D0 (geometric means), near 1.
    logN0, logD0 = float(np.log(N).mean()), float(np.log(D).mean())
    fixed = {"A": -np.inf, "alpha": 0.0}
    if not fit_eps:
        fixed["eps"] = math.log(eps)
    obj = _Objective(np.log(N) - logN0, np.log(D) - logD0, r, np.log(loss), free, fixed, delta)

    grid_names = [n for n in ("alpha", "beta", "eta", "gamma", "eps") if n in free]
    candidates = []
    for values in itertools.product(*(GRID[n] for n in grid_names)):
        expo = {"alpha": 0.0, "eps": fixed.get("eps", 0.0)}
        expo.update(dict(zip(grid_names, values, strict=True)))
        if "eps" in grid_names:
            expo["eps"] = math.log(expo["eps"])
        start = _nnls_start(obj, expo, loss)
        x0 = np.array([start[n] for n in free])
        candidates.append((obj(x0)[0], x0))
    candidates.sort(key=lambda c: c[0])

    best = None
    bounds = _bounds(free)
    for _, x0 in candidates[:STARTS]:
        res = minimize(
            obj, x0, jac=True, method="L-BFGS-B", bounds=bounds, options={"maxiter": 3000, "ftol": 1e-14, "gtol": 1e-10}
        )
        if best is None or res.fun < best.fun:
            best = res
    v = obj.full(best.x)
    # Undo the scaling: A/(N/N0)^alpha = (A*N0^alpha)/N^alpha, likewise B with D0^beta.
    params = LawParams(
        E=math.exp(v["E"]),
        A=math.exp(v["A"] + v["alpha"] * logN0) if fit_size else 0.0,
        alpha=v["alpha"] if fit_size else 0.0,
        B=math.exp(v["B"] + v["beta"] * logD0),
        beta=v["beta"],
        eta=v["eta"],
        C=math.exp(v["C"]),
        gamma=v["gamma"],
        eps=math.exp(v["eps"]),
    )
    return FitResult(
        params=params,
        fitted=free,
        objective=float(best.fun) * delta,
        starts=min(STARTS, len(candidates)),
        points=len(loss),
    )
