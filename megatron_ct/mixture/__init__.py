"""Choosing the domain/general data mixture before the big run: the D-CPT law.

``sweep`` writes (and runs) small proxy runs over domain ratios; ``observations`` reads their
evaluations (or a JSON-lines file) as (ratio, tokens, params, set, loss) points; ``law`` fits
``L(N, D, r) = E + A/N^alpha + B*r^eta/D^beta + C/(r + eps)^gamma`` per validation set;
``recommend`` predicts both sets' losses over the ratio at a target budget and picks the ratio;
``report`` runs it all for a pair of sets and writes fit.json and fit.png.
Entry points: tools/sweep_mixture.py and tools/fit_mixture.py.
"""
