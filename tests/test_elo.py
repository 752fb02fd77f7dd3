"""Elo from pairwise games: the Bradley–Terry fit recovers known strengths, its bootstrap covers
them."""

import numpy as np

from nanosafe.evaluate import elo_intervals, elo_mle


def games(true, per_pair, seed):
    rng = np.random.default_rng(seed)
    names, out = sorted(true), []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            p = 1 / (1 + 10 ** ((true[b] - true[a]) / 400))
            for won in rng.random(per_pair) < p:
                out.append((a, b) if won else (b, a))
    return out


def test_elo_mle_hand_value_two_players():
    # a wins 3 of 4 (+ the 0.5/0.5 prior: 3.5 of 5): p = 0.7, so r_a − r_b = 400·log10(0.7 / 0.3)
    r = elo_mle([("a", "b")] * 3 + [("b", "a")])
    assert abs((r["a"] - r["b"]) - 400 * np.log10(0.7 / 0.3)) < 1e-6
    assert abs((r["a"] + r["b"]) / 2 - 1000) < 1e-9


def test_elo_recovers_known_strengths_and_intervals_cover_them():
    true = {"sft": 900.0, "round1": 1000.0, "round2": 1050.0, "round3": 1150.0}  # mean 1025
    ci = elo_intervals(games(true, 400, seed=1), n_boot=300, seed=0, prior=0.0)
    for n, t in true.items():
        r, lo, hi = ci[n]
        t = t - 25.0  # ratings are reported with mean 1000
        assert abs(r - t) < 25, (n, r, t)
        assert lo < t < hi, (n, lo, t, hi)
        assert hi - lo < 80, (n, lo, hi)  # informative, so covering is not trivial
    # the order is recovered
    assert sorted(true, key=lambda n: ci[n][0]) == ["sft", "round1", "round2", "round3"]
