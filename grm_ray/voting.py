"""Voting over GRM samples (GRM_SPEC sections 4-5) and the adaptive stopping rules.

A sample here is a mapping with `scores` (ints in the ORIGINAL response order, None when invalid) and an
optional `meta_score`. Scores are 1..10, so one more sample moves any two totals apart by at most 9.
"""
from __future__ import annotations

import collections
import math
import random

import numpy as np
from typing import Any, Mapping, Sequence

MAX_SWING = 9  # the most one sample can change (score_i - score_j)


def unshuffle(scores: Sequence[int], order: Sequence[int]) -> list[int]:
    """Map scores given in shown order back to original response indices.

    order[p] is the original index of the response shown at position p.
    >>> unshuffle([7, 3], [1, 0])
    [3, 7]
    """
    out = [0] * len(order)
    for pos, idx in enumerate(order):
        out[idx] = scores[pos]
    return out


def select_kept(samples: Sequence[Mapping[str, Any]], k_meta: int | None) -> list[int]:
    """Indices of the samples that vote: every valid one, or the k_meta valid ones of highest meta_score.

    A missing (or NaN) meta_score ranks last. Ties take the response orders in turn (the first sample of
    each order, then the second...): samples are stored grouped by order, so "the earlier sample" would
    keep one order only, and a meta RM that rates nothing (an item too long for it) would bring position
    bias back.
    """
    valid = [i for i, s in enumerate(samples) if s.get("scores") is not None]
    if k_meta is None:
        return valid
    seen: collections.Counter = collections.Counter()
    turn = {}
    for i in valid:
        order = tuple(samples[i].get("order") or ())
        turn[i], seen[order] = seen[order], seen[order] + 1
    rank = sorted(valid, key=lambda i: (-_meta(samples[i]), turn[i], i))
    return sorted(rank[:k_meta])


def _meta(sample: Mapping[str, Any]) -> float:
    m = sample.get("meta_score")
    return -math.inf if m is None or (isinstance(m, float) and math.isnan(m)) else float(m)


def vote(samples: Sequence[Mapping[str, Any]], k_meta: int | None = None, seed: int = 0,
         n: int | None = None) -> dict[str, Any]:
    """Aggregate samples into per-response rewards and a winner.

    rewards[i] = mean kept score of response i (1..10); vote_totals[i] = their sum; ties for the top are
    reported in `tie` and broken with random.Random(seed); margin = best reward minus the best other reward
    (None for a single response); confidence = the posterior probability that more samples would not change
    the winner (see `confidence`; over the kept samples). With no valid sample every result is None.
    >>> vote([{"scores": [8, 3]}, {"scores": [6, 5]}])["rewards"]
    [7.0, 4.0]
    """
    if k_meta is not None and k_meta < 1:  # 0 would keep no sample and return a row of None, silently
        raise ValueError(f"k_meta must be at least 1 (or None: every valid sample votes), got {k_meta}")
    kept = select_kept(samples, k_meta)
    result: dict[str, Any] = {
        "rewards": None, "vote_totals": None, "best_index": None, "margin": None, "tie": None, "confidence": None,
        "n_samples": len(samples), "n_valid": sum(s.get("scores") is not None for s in samples),
        "n_kept": len(kept),
    }
    if not kept:
        return result
    n = n or len(samples[kept[0]]["scores"])
    if any(len(samples[i]["scores"]) != n for i in kept):
        raise ValueError(f"every valid sample needs exactly {n} scores; got lengths "
                         f"{sorted({len(samples[i]['scores']) for i in kept})}")
    totals = [float(sum(samples[i]["scores"][j] for i in kept)) for j in range(n)]
    top = max(totals)
    leaders = [j for j, t in enumerate(totals) if t == top]
    best = leaders[0] if len(leaders) == 1 else random.Random(seed).choice(leaders)
    rewards = [t / len(kept) for t in totals]
    others = [r for j, r in enumerate(rewards) if j != best]
    conf = confidence([samples[i]["scores"] for i in kept], best,
                      [samples[i]["order"] for i in kept] if all(samples[i].get("order") for i in kept) else None)
    if conf is not None and len(leaders) > 1:
        # a tie's winner is a coin flip: kept samples unevenly spread over the orders can tilt the de-biased
        # posterior, but a tied row must never pass a confidence filter
        conf = min(conf, 0.5)
    result.update(rewards=rewards, vote_totals=totals, best_index=best, tie=len(leaders) > 1,
                  margin=rewards[best] - max(others) if others else None, confidence=conf)
    return result


def lead(totals: Sequence[float]) -> float:
    """The leader's total minus the runner-up's (inf for a single response)."""
    if len(totals) < 2:
        return math.inf
    a, b = sorted(totals, reverse=True)[:2]
    return a - b


def decided_exact(totals: Sequence[float], remaining: int) -> bool:
    """True when no `remaining` samples can change the plain-vote winner: lead > 9 x remaining.

    A lead of exactly 9 x remaining could still end in a tie, so it does not count.
    """
    return remaining <= 0 or lead(totals) > MAX_SWING * remaining


# The posterior of the confident rule and of `confidence` (ours). Per-sample score differences
# d = s_leader - s_rival are i.i.d. normal with unknown mean and variance; flat prior on the mean and a
# scaled-inverse-chi2 prior on the variance worth PRIOR_DOF samples of variance PRIOR_VAR (a score-gap SD of 4
# points), so that a few identical samples do not claim certainty. Chosen so that the rule keeps its risk on
# a hard uniform-score mix (tests/unit/test_voting.py) and on the paper-fitted simulation (bench/RESULTS.md).
PRIOR_VAR = 16.0
PRIOR_DOF = 4.0


def flip_probability(score_rows: Sequence[Sequence[float]], remaining: int | None = None,
                     best: int | None = None, orders: Sequence[Sequence[int]] | None = None) -> float:
    """Posterior probability that the leader `best` (default: the highest total) is not the winner after
    `remaining` more samples (None: infinitely many, i.e. that its true mean score is not the highest).

    Per rival j the posterior predictive of the future sum of d_j is Student-t (normal model above); a
    flip is a final d-total <= 0 (a tie counts as a flip). Rivals are combined by a union bound, capped at 1.
    With `orders` (each row's shown order), position bias is taken out: the samples of one rival are grouped
    by where the leader and the rival were shown, the mean gap is the equal-weight mean of the group means
    (the orders are balanced, GRM_SPEC section 4) and the variance is pooled within groups; future samples
    are assumed balanced too.
    >>> round(flip_probability([[8, 3], [7, 4], [9, 3], [8, 2]], remaining=28), 3)
    0.006
    """
    from scipy.special import stdtr

    rows = np.asarray(score_rows, dtype=float)
    if rows.ndim != 2 or rows.shape[0] == 0:
        return 1.0
    m, n = rows.shape
    if n < 2:
        return 0.0
    best = int(np.argmax(rows.sum(0))) if best is None else best
    pos = np.argsort(np.asarray(orders), axis=1) if orders is not None else np.zeros((m, n), dtype=int)
    total = 0.0
    for j in range(n):
        if j == best:
            continue
        d = rows[:, best] - rows[:, j]
        _, group, sizes = np.unique(pos[:, best] * n + pos[:, j], return_inverse=True, return_counts=True)
        means = np.bincount(group, weights=d) / sizes
        mean = means.mean()
        dof = PRIOR_DOF + m - len(sizes)
        var = (PRIOR_DOF * PRIOR_VAR + ((d - means[group]) ** 2).sum()) / dof
        var_mean = var * (1 / sizes).sum() / len(sizes) ** 2  # = var / m for one group
        if remaining is None:
            total += stdtr(dof, -mean / np.sqrt(var_mean))
        elif remaining <= 0:
            total += float(d.sum() <= 0)
        else:
            r = remaining
            total += stdtr(dof, (0.5 - d.sum() - r * mean) / np.sqrt(var * r + r * r * var_mean))
    return float(min(1.0, total))


def confidence(score_rows: Sequence[Sequence[float]], best: int,
               orders: Sequence[Sequence[int]] | None = None) -> float | None:
    """Probability that more samples would not change the winner `best`: 1 - flip_probability(rows, None).

    None for single responses (nothing to change) and items without a valid sample.
    """
    if not score_rows or len(score_rows[0]) < 2:
        return None
    return 1.0 - flip_probability(score_rows, None, best, orders)


def decided_confident(score_rows: Sequence[Sequence[int]], remaining: int, risk: float,
                      orders: Sequence[Sequence[int]] | None = None) -> bool:
    """Stop once the posterior predictive chance that `remaining` more samples change the plain-vote
    winner is at most `risk` (or the exact rule already stops)."""
    if remaining <= 0:
        return True
    if not score_rows:
        return False
    if decided_exact([sum(col) for col in zip(*score_rows)], remaining):
        return True
    return flip_probability(score_rows, remaining, orders=orders) <= risk
