"""Voting over GRM samples (GRM_SPEC sections 4-5) and the adaptive stopping rules.

A sample here is a mapping with `scores` (ints in the ORIGINAL response order, None when invalid) and an
optional `meta_score`. Scores are 1..10, so one more sample moves any two totals apart by at most 9.
"""
from __future__ import annotations

import math
import random
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

    Ties in meta_score keep the earlier sample; a missing meta_score ranks last.
    """
    valid = [i for i, s in enumerate(samples) if s.get("scores") is not None]
    if k_meta is None:
        return valid
    rank = sorted(valid, key=lambda i: (-_meta(samples[i]), i))
    return sorted(rank[:k_meta])


def _meta(sample: Mapping[str, Any]) -> float:
    m = sample.get("meta_score")
    return -math.inf if m is None or (isinstance(m, float) and math.isnan(m)) else float(m)


def vote(samples: Sequence[Mapping[str, Any]], k_meta: int | None = None, seed: int = 0,
         n: int | None = None) -> dict[str, Any]:
    """Aggregate samples into per-response rewards and a winner.

    rewards[i] = mean kept score of response i (1..10); vote_totals[i] = their sum; ties for the top are
    reported in `tie` and broken with random.Random(seed); margin = best reward minus the best other reward
    (None for a single response). With no valid sample every result is None.
    >>> vote([{"scores": [8, 3]}, {"scores": [6, 5]}])["rewards"]
    [7.0, 4.0]
    """
    kept = select_kept(samples, k_meta)
    result: dict[str, Any] = {
        "rewards": None, "vote_totals": None, "best_index": None, "margin": None, "tie": None,
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
    result.update(
        rewards=rewards, vote_totals=totals, best_index=best, tie=len(leaders) > 1,
        margin=rewards[best] - max(others) if others else None,
    )
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


def decided_confident(score_rows: Sequence[Sequence[int]], remaining: int, risk: float,
                      rounds: int) -> bool:
    """Stop once the chance that the full-k winner differs is bounded by `risk`.

    The bound (ours): treat per-sample score differences d = s_leader - s_j (range 18) as i.i.d. For each
    rival j, Hoeffding on the m samples seen gives a lower bound mu_lo on E[d] at level r, and Hoeffding
    on the `remaining` future samples bounds P(D_seen + sum(future d) <= 0) given mu >= mu_lo. r is
    risk / (2 x rivals x rounds): a union bound over both steps, every rival and every check.
    """
    if remaining <= 0:
        return True
    m = len(score_rows)
    if m == 0:
        return False
    n = len(score_rows[0])
    totals = [sum(r[j] for r in score_rows) for j in range(n)]
    if decided_exact(totals, remaining):
        return True
    best = max(range(n), key=lambda j: totals[j])
    r = risk / (2 * max(1, n - 1) * max(1, rounds))
    for j in range(n):
        if j == best:
            continue
        seen = totals[best] - totals[j]
        mu_lo = seen / m - 18 * math.sqrt(math.log(1 / r) / (2 * m))
        slack = seen + remaining * mu_lo
        if slack <= 0 or math.exp(-2 * slack**2 / (remaining * 18**2)) > r:
            return False
    return True
