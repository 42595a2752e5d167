"""Voting, meta-guided selection and the adaptive stopping rules (GRM_SPEC sections 4-5)."""
from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from grm_ray.voting import (confidence, decided_confident, decided_exact, flip_probability, lead, select_kept,
                            unshuffle, vote)


def S(scores, meta=None):
    return {"scores": scores, "meta_score": meta}


# --------------------------------------------------------------------------- hand-computed votes


def test_vote_plain_two_responses():
    r = vote([S([8, 3]), S([6, 5]), S([7, 7])])
    assert r["vote_totals"] == [21.0, 15.0]
    assert r["rewards"] == [7.0, 5.0]
    assert r["best_index"] == 0
    assert r["margin"] == 2.0
    assert r["tie"] is False
    assert (r["n_samples"], r["n_valid"], r["n_kept"]) == (3, 3, 3)


def test_vote_list_of_three():
    r = vote([S([2, 9, 4]), S([3, 8, 8]), S([1, 10, 6])])
    assert r["vote_totals"] == [6.0, 27.0, 18.0]
    assert r["rewards"] == [2.0, 9.0, 6.0]
    assert r["best_index"] == 1
    assert r["margin"] == 3.0
    assert r["tie"] is False


def test_invalid_samples_never_vote():
    r = vote([S([8, 3]), S(None), S([6, 5]), {"scores": None, "meta_score": 99.0}])
    assert r["vote_totals"] == [14.0, 8.0]
    assert r["rewards"] == [7.0, 4.0]
    assert (r["n_samples"], r["n_valid"], r["n_kept"]) == (4, 2, 2)


def test_k_meta_keeps_the_top_meta_scores():
    samples = [S([1, 10], -15.78), S([9, 2], 1.31), S([8, 3], 1.67), S([2, 9], 0.5), S(None, 50.0)]
    r = vote(samples, k_meta=2)
    # kept: samples 1 and 2 (the invalid one with the highest meta never votes)
    assert select_kept(samples, 2) == [1, 2]
    assert r["vote_totals"] == [17.0, 5.0]
    assert r["rewards"] == [8.5, 2.5]
    assert r["best_index"] == 0
    assert (r["n_samples"], r["n_valid"], r["n_kept"]) == (5, 4, 2)
    # plain voting over the same samples picks the other response
    plain = vote(samples)
    assert plain["vote_totals"] == [20.0, 24.0] and plain["best_index"] == 1


def test_k_meta_ties_keep_the_earlier_sample_and_missing_meta_ranks_last():
    samples = [S([5, 5], None), S([6, 4], 1.0), S([7, 3], 1.0), S([8, 2], 1.0), S([9, 1], float("nan")),
               S([4, 6], -100.0)]
    assert select_kept(samples, 2) == [1, 2]
    assert select_kept(samples, 3) == [1, 2, 3]
    assert select_kept(samples, 4) == [1, 2, 3, 5]  # a real meta score beats a missing/NaN one
    assert select_kept(samples, 5) == [0, 1, 2, 3, 5]  # then missing ones, earlier first
    assert select_kept(samples, 100) == [0, 1, 2, 3, 4, 5]
    assert select_kept(samples, None) == [0, 1, 2, 3, 4, 5]
    assert select_kept([S(None, 3.0), S([1, 2])], None) == [1]


def test_k_meta_ties_take_the_response_orders_in_turn():
    """Samples are stored grouped by order: a meta RM that rates nothing (an item too long for it) must not keep
    one order only. Here a purely position-biased GRM (first shown 8, second 5) must come out tied."""
    nan = float("nan")
    shown_b_first = [{"scores": [5, 8], "order": [1, 0], "meta_score": nan}] * 4
    shown_a_first = [{"scores": [8, 5], "order": [0, 1], "meta_score": nan}] * 4
    samples = shown_b_first + shown_a_first
    assert select_kept(samples, 4) == [0, 1, 4, 5]
    r = vote(samples, k_meta=4)
    assert r["tie"] and r["vote_totals"] == [26.0, 26.0]
    # rated samples still come first, whatever their order
    samples[6] = {**samples[6], "meta_score": 2.0}
    assert select_kept(samples, 3) == [0, 4, 6]


def test_a_tie_never_reports_more_than_half_confidence():
    """Kept samples unevenly spread over the orders (meta selection) tilt the de-biased posterior; a tied row
    is a coin flip all the same."""
    a, b = [0, 1], [1, 0]
    samples = [{"scores": [7, 5], "order": a, "meta_score": m} for m in (2.0, 1.9, 1.8)] + \
        [{"scores": [6, 6], "order": a, "meta_score": -1.0}, {"scores": [3, 9], "order": b, "meta_score": 1.7}] + \
        [{"scores": [5, 6], "order": b, "meta_score": -2.0}] * 3
    for seed in range(6):  # either tie-break
        r = vote(samples, k_meta=4, seed=seed)
        assert r["tie"] and r["vote_totals"] == [24.0, 24.0] and r["confidence"] <= 0.5


def test_k_meta_larger_than_valid_keeps_all_valid():
    r = vote([S([8, 3], 1.0), S(None, 2.0), S([6, 5], 0.0)], k_meta=8)
    assert r["n_kept"] == 2 and r["vote_totals"] == [14.0, 8.0]


def test_seeded_tie_break_is_deterministic_and_only_among_the_tied():
    samples = [S([5, 8, 8, 3]), S([6, 7, 7, 9])]  # totals 11, 15, 15, 12
    picks = set()
    for seed in range(60):
        r = vote(samples, seed=seed)
        assert r["tie"] is True
        assert r["best_index"] in (1, 2)
        assert r["margin"] == 0.0
        assert r["vote_totals"] == [11.0, 15.0, 15.0, 12.0]
        assert vote(samples, seed=seed)["best_index"] == r["best_index"]
        picks.add(r["best_index"])
    assert picks == {1, 2}  # the seed really decides


def test_single_response():
    r = vote([S([7]), S([9]), S(None)])
    assert r["rewards"] == [8.0] and r["vote_totals"] == [16.0]
    assert r["best_index"] == 0 and r["margin"] is None and r["tie"] is False
    assert (r["n_samples"], r["n_valid"], r["n_kept"]) == (3, 2, 2)


@pytest.mark.parametrize("samples", [[], [S(None)], [S(None), S(None, 3.0)]])
def test_no_valid_sample_gives_none(samples):
    r = vote(samples, k_meta=2, n=2)
    for key in ("rewards", "vote_totals", "best_index", "margin", "tie"):
        assert r[key] is None
    assert r["n_samples"] == len(samples) and r["n_valid"] == 0 and r["n_kept"] == 0


def test_mismatched_score_lengths_raise():
    with pytest.raises(ValueError, match="scores"):
        vote([S([8, 3]), S([6, 5, 4])])
    with pytest.raises(ValueError):
        vote([S([8, 3]), S([6, 5])], n=3)


def test_unshuffle_hand_case():
    assert unshuffle([7, 3], [1, 0]) == [3, 7]
    assert unshuffle([1, 2, 3], [2, 0, 1]) == [2, 3, 1]


def test_lead_and_exact_rule_hand_cases():
    assert lead([10, 3, 7]) == 3
    assert lead([5]) == math.inf
    assert decided_exact([30, 10], 2) is True       # 20 > 18
    assert decided_exact([28, 10], 2) is False      # 18 = 9 x 2 could still tie
    assert decided_exact([10, 10], 0) is True       # nothing left to draw
    assert decided_exact([0, 0], 1) is False
    assert decided_exact([7], 5) is True            # a single response is always decided


# --------------------------------------------------------------------------- properties


@st.composite
def permutation_and_scores(draw):
    n = draw(st.integers(1, 8))
    order = draw(st.permutations(list(range(n))))
    shown = draw(st.lists(st.integers(1, 10), min_size=n, max_size=n))
    return order, shown


@settings(max_examples=300, deadline=None)
@given(permutation_and_scores())
def test_unshuffle_inverts_showing(case):
    order, shown = case
    out = unshuffle(shown, order)
    for p in range(len(order)):
        assert out[order[p]] == shown[p]
    # showing the original scores in `order` gives back `shown`
    assert [out[j] for j in order] == shown


@st.composite
def sample_sets(draw, min_n=1, max_n=6, max_k=12):
    n = draw(st.integers(min_n, max_n))
    k = draw(st.integers(1, max_k))
    rows = draw(st.lists(st.one_of(st.none(), st.lists(st.integers(1, 10), min_size=n, max_size=n)),
                         min_size=k, max_size=k))
    metas = draw(st.lists(st.one_of(st.none(), st.floats(-20, 20, allow_nan=False)), min_size=k, max_size=k))
    return n, [S(r, m) for r, m in zip(rows, metas)]


@settings(max_examples=200, deadline=None)
@given(sample_sets(min_n=2), st.data())
def test_permuting_responses_permutes_rewards(case, data):
    n, samples = case
    perm = data.draw(st.permutations(list(range(n))))  # new response j is old response perm[j]
    permuted = [S(None if s["scores"] is None else [s["scores"][perm[j]] for j in range(n)], s["meta_score"])
                for s in samples]
    k_meta = data.draw(st.one_of(st.none(), st.integers(1, len(samples))))
    a, b = vote(samples, k_meta=k_meta, n=n), vote(permuted, k_meta=k_meta, n=n)
    if a["rewards"] is None:
        assert b["rewards"] is None
        return
    assert b["rewards"] == [a["rewards"][perm[j]] for j in range(n)]
    assert b["vote_totals"] == [a["vote_totals"][perm[j]] for j in range(n)]
    assert b["tie"] == a["tie"] and b["margin"] == a["margin"]
    if not a["tie"]:
        assert perm[b["best_index"]] == a["best_index"]


@settings(max_examples=300, deadline=None)
@given(sample_sets(), st.integers(1, 14))
def test_top_k_meta_selection_is_sorting_by_meta(case, k_meta):
    _, samples = case
    kept = select_kept(samples, k_meta)
    valid = [i for i, s in enumerate(samples) if s["scores"] is not None]
    assert kept == sorted(kept)
    assert set(kept) <= set(valid)
    assert len(kept) == min(k_meta, len(valid))

    def meta(i):
        m = samples[i]["meta_score"]
        return -math.inf if m is None else m

    dropped = [i for i in valid if i not in kept]
    for i in kept:
        for j in dropped:
            # a kept sample has the higher meta score, or the same one and comes earlier (no orders here)
            assert meta(i) > meta(j) or (meta(i) == meta(j) and i < j)
    # the vote counts exactly the kept samples
    r = vote(samples, k_meta=k_meta)
    assert r["n_kept"] == len(kept)


@settings(max_examples=200, deadline=None)
@given(sample_sets(max_k=16), st.integers(0, 10**6))
def test_rewards_are_means_of_kept_scores_in_range(case, seed):
    n, samples = case
    r = vote(samples, seed=seed, n=n)
    valid = [s["scores"] for s in samples if s["scores"] is not None]
    if not valid:
        assert r["best_index"] is None
        return
    assert r["vote_totals"] == [float(sum(v[j] for v in valid)) for j in range(n)]
    assert all(1 <= x <= 10 for x in r["rewards"])
    top = max(r["vote_totals"])
    assert r["vote_totals"][r["best_index"]] == top
    assert r["tie"] == (r["vote_totals"].count(top) > 1)
    if n > 1:
        assert r["margin"] >= 0 and (r["margin"] == 0) == r["tie"]


@st.composite
def sample_sequences(draw):
    n = draw(st.sampled_from([2, 2, 3, 4]))  # pairs and lists
    k = draw(st.integers(1, 24))
    # a strong leader in many cases so that early stops actually happen
    bias = draw(st.lists(st.integers(0, 8), min_size=n, max_size=n))
    seq = []
    for _ in range(k):
        if draw(st.integers(0, 9)) == 0:
            seq.append(None)  # an invalid sample: counts as drawn, never votes
        else:
            seq.append([min(10, draw(st.integers(1, 2)) + b) for b in bias])
    return n, seq


@settings(max_examples=300, deadline=None)
@given(sample_sequences())
def test_exact_early_stop_never_changes_the_winner(case):
    n, seq = case
    k = len(seq)
    full = vote([S(s) for s in seq], n=n)
    for m in range(k):  # prefixes that still have samples to come
        valid = [s for s in seq[:m] if s is not None]
        totals = [sum(s[j] for s in valid) for j in range(n)]
        if decided_exact(totals, k - m):
            leader = max(range(n), key=lambda j: totals[j])
            assert totals.count(totals[leader]) == 1
            assert full["tie"] is False
            assert full["best_index"] == leader
            # and the confident rule stops at least whenever the exact one does
            assert decided_confident(valid, k - m, risk=0.01) is True


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.integers(1, 10), min_size=2, max_size=2), max_size=10),
       st.floats(0.001, 0.5))
def test_confident_rule_bounds(rows, risk):
    assert decided_confident(rows, 0, risk) is True
    assert decided_confident([], 0, risk) is True
    assert decided_confident([], 5, risk) is False  # never stops before seeing a sample
    if rows:
        p = flip_probability(rows, 5)
        assert 0 <= p <= 1 and decided_confident(rows, 5, risk) == (p <= risk or decided_exact(
            [sum(c) for c in zip(*rows)], 5))


def test_confident_rule_stops_early_on_a_clear_winner_but_not_on_a_close_race():
    clear = [[10, 1]] * 16
    assert decided_exact([160, 16], 16) is False   # 144 is not > 9 x 16
    assert decided_confident(clear, 16, risk=0.05) is True
    assert decided_confident([[9, 4], [8, 5]] * 3, 26, risk=0.01) is True  # 6 steady samples of a 32
    close = [[6, 5], [5, 6]] * 5 + [[7, 5]]
    assert decided_confident(close, 20, risk=0.05) is False


def test_confident_rule_rarely_changes_the_winner():
    """Monte Carlo: the chance that the confident stop picks a different winner than full k stays below risk."""
    rng = random.Random(1234)
    risk, k, trials, wrong, stopped_early = 0.05, 32, 400, 0, 0
    for _ in range(trials):
        gap = rng.choice([0, 1, 2, 3, 5])
        seq = [[min(10, rng.randint(1, 8) + gap), rng.randint(1, 8)] for _ in range(k)]
        full = vote([S(s) for s in seq], n=2)
        for m in range(2, k, 2):  # checks after each balanced round of a pair
            if decided_confident(seq[:m], k - m, risk):
                stopped_early += 1
                totals = [sum(s[j] for s in seq[:m]) for j in range(2)]
                if full["tie"] or max(range(2), key=lambda j: totals[j]) != full["best_index"]:
                    wrong += 1
                break
    assert stopped_early > 0
    assert wrong <= risk * trials


def test_flip_probability_and_confidence():
    # a tie in the seen totals is a coin flip; a steady lead is near-certain; more samples to come -> riskier
    assert flip_probability([[6, 5], [5, 6]]) == pytest.approx(0.5)
    steady = [[8, 3], [7, 4], [9, 3], [8, 2]]
    assert flip_probability(steady, 4) < flip_probability(steady, 28) < 0.01
    assert flip_probability(steady, 0) == 0.0 and flip_probability([], 3) == 1.0
    # the leader is judged against every rival (union bound): a close third response raises the flip chance
    assert flip_probability([[8, 3, 7], [7, 4, 7], [9, 3, 8]], None) > flip_probability([[8, 3], [7, 4], [9, 3]], None)
    assert confidence([[7]], 0) is None and confidence([], 0) is None
    assert confidence(steady, 0) == pytest.approx(1 - flip_probability(steady, None))
    assert confidence(steady, 1) < 0.01  # the trailing response as winner: confidence near 0
    v = vote([S(s) for s in steady], n=2)
    assert v["confidence"] == pytest.approx(confidence(steady, 0)) and v["confidence"] > 0.99
    assert vote([S(None)], n=2)["confidence"] is None


def test_confidence_is_calibrated_on_the_normal_model():
    """Items drawn from the prior's own model: among items whose confidence is c, the true better response
    (the one with the higher mean) wins the vote about a share c of the time."""
    rng = random.Random(7)
    conf, hit = [], []
    for _ in range(3000):
        mu, sd = rng.gauss(0, 1.5), 2.0
        rows = [[round(5 + mu / 2 + rng.gauss(0, sd)), round(5 - mu / 2 + rng.gauss(0, sd))] for _ in range(6)]
        v = vote([S(r) for r in rows], n=2, seed=rng.randrange(10**6))
        conf.append(v["confidence"])
        hit.append(v["best_index"] == (0 if mu > 0 else 1))
    mean_conf, accuracy = sum(conf) / len(conf), sum(hit) / len(hit)
    assert abs(mean_conf - accuracy) < 0.04, (mean_conf, accuracy)


def test_k_meta_below_one_is_refused_not_an_empty_vote():
    with pytest.raises(ValueError, match="k_meta must be at least 1"):
        vote([{"scores": [8, 3], "meta_score": 1.0}], k_meta=0)
