"""Observations drawn from known D-CPT laws plus multiplicative noise, for fit tests.

The domain set's loss falls with the domain share, the general set's rises with it (its own
share is 1 - domain share); magnitudes are those of a ~1B-token continual-pretraining sweep.
"""

from __future__ import annotations

import json

import numpy as np

from megatron_ct.mixture.law import LawParams
from megatron_ct.mixture.recommend import SetLaw

DOMAIN = LawParams(E=1.6, A=0.0, alpha=0.0, B=30.0, beta=0.25, eta=0.6, C=0.3, gamma=0.45, eps=0.04)
GENERAL = LawParams(E=2.1, A=0.0, alpha=0.0, B=8.0, beta=0.2, eta=0.4, C=0.12, gamma=0.8, eps=0.08)
RATIOS = (0.0, 0.1, 0.25, 0.4, 0.55, 0.7, 0.85)
TOKENS = tuple(np.geomspace(2e7, 5e8, 10).tolist())
PARAMS = 1.0e8
NOISE = 0.002  # relative, per point


def true_laws(domain_set: str = "zh", general_set: str = "en") -> tuple[SetLaw, SetLaw]:
    return SetLaw(domain_set, "domain", DOMAIN), SetLaw(general_set, "general", GENERAL)


def observations(
    seed: int,
    ratios=RATIOS,
    tokens=TOKENS,
    params=(PARAMS,),
    noise: float = NOISE,
    laws: tuple[LawParams, LawParams] = (DOMAIN, GENERAL),
    names: tuple[str, str] = ("zh", "en"),
) -> list[dict]:
    """Records {"ratio", "tokens", "params", "set", "loss"} (the --observations format)."""
    rng = np.random.default_rng(seed)
    out = []
    for n in params:
        for r in ratios:
            for d in tokens:
                for name, law, own in ((names[0], laws[0], r), (names[1], laws[1], 1.0 - r)):
                    loss = float(law.predict(n, d, own)) * (1.0 + noise * rng.standard_normal())
                    out.append({"ratio": r, "tokens": d, "params": n, "set": name, "loss": loss})
    return out


def write_jsonl(path, records: list[dict]) -> str:
    with open(path, "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    return str(path)
