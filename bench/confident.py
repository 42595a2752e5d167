"""4. The confident stopping rule: simulation fitted to the paper, and replay on stored full-k runs.

Simulation (pairs, Reward Bench): item i has a latent score gap delta_i ~ N(mu, tau^2) between the labelled
best and the other response, a base score b_i ~ U(4.5, 6.5) and a noise level s_i = sigma * exp(omega * z_i);
one GRM sample scores them clip(round(b_i +- delta_i / 2 + s_i * e), 1, 10) with fresh normal e. The four
parameters are fitted (`--fit`) so the simulated Voting@1 / @8 / @32 (random tie-break, as expectation) match
the paper's Reward Bench figures for DeepSeek-GRM-27B, 85.2 / 87.7 / 88.5 (GRM_SPEC section 7).

Both parts run the GRMSampler stage's own stopping rule (GRMSampler._done, its first-round size and round
size) on samples in the order the sampler draws them, and compare the winner at the stop with full
Voting@k (seeded tie-break, as the Vote stage): share of changed winners, samples saved, and k / samples used.

    python -m bench.confident sim [--items 10000] [--fit]
    python -m bench.confident replay SCORED_DIR [SCORED_DIR ...]   # runs made with adaptive off
"""
from __future__ import annotations

import argparse
import math
from typing import Any, Sequence

import numpy as np

from bench import common

RISKS = (0.01, 0.05)
KS = (8, 16, 32)
PAPER_RB = {1: 0.852, 8: 0.877, 32: 0.885}
# Fitted with `python -m bench.confident sim --fit` (20000 items, Nelder-Mead from a small grid).
FITTED = {"mu": 4.165, "tau": 3.468, "sigma": 1.063, "omega": 0.548}


def simulate(items: int, k: int, params: dict[str, float], seed: int = 0) -> np.ndarray:
    """Scores of k samples for `items` pairs: array items x k x 2, column 0 the labelled best."""
    rng = np.random.default_rng(seed)
    delta = params["mu"] + params["tau"] * rng.standard_normal(items)
    noise = params["sigma"] * np.exp(params["omega"] * rng.standard_normal(items))
    base = rng.uniform(4.5, 6.5, items)
    e = rng.standard_normal((items, k, 2))
    mean = np.stack([base + delta / 2, base - delta / 2], axis=1)[:, None, :]
    return np.clip(np.rint(mean + noise[:, None, None] * e), 1, 10).astype(int)


def voting_accuracy(scores: np.ndarray, js: Sequence[int] = (1, 8, 32)) -> dict[int, float]:
    """Voting@j over the first j samples, label = response 0, ties counted 1/2 (the random tie-break)."""
    out = {}
    for j in js:
        d = (scores[:, :j, 0] - scores[:, :j, 1]).sum(1)
        out[j] = float(((d > 0) + 0.5 * (d == 0)).mean())
    return out


def fit(items: int = 20000) -> dict[str, float]:
    """Least squares on Voting@1/8/32 against the paper, common random numbers, Nelder-Mead."""
    import itertools

    from scipy.optimize import minimize

    target = np.array([PAPER_RB[j] for j in (1, 8, 32)])

    def loss(p: Sequence[float]) -> float:
        params = dict(zip(("mu", "tau", "sigma", "omega"), (p[0], abs(p[1]), abs(p[2]), p[3])))
        acc = voting_accuracy(simulate(items, 32, params, seed=1))
        return float(((np.array([acc[j] for j in (1, 8, 32)]) - target) ** 2).sum() * 1e4)

    start = min(itertools.product([2, 4], [2, 4], [1, 2], [0.5, 1.0]), key=loss)
    res = minimize(loss, start, method="Nelder-Mead", options={"maxiter": 200, "xatol": 1e-3, "fatol": 1e-4})
    return {"mu": res.x[0], "tau": abs(res.x[1]), "sigma": abs(res.x[2]), "omega": res.x[3]}


def sampler_for(k: int, adaptive: str, risk: float = 0.01) -> Any:
    """The GRMSampler stage with its own stopping rule; no engine is used."""
    from grm_ray.config import JobConfig
    from grm_ray.stages import GRMSampler

    cfg = JobConfig(model="none", k=k, adaptive=adaptive, risk=risk or 0.01)
    return GRMSampler(cfg, engine=object())


def stop_after(seq: Sequence[dict[str, Any]], n: int, k: int, sampler: Any) -> int:
    """Samples the adaptive sampler would draw before stopping, given samples in drawing order."""
    size = sampler._round_size(n)
    rounds = math.ceil(k / size)
    first = sampler._first_round(n, size, rounds)
    drawn = 0
    while True:
        drawn += min(size if drawn else first, k - drawn)
        if sampler._done({"samples": list(seq[:drawn])}, drawn, rounds):
            return drawn


def replay_items(items: list[tuple[str, int, list[dict[str, Any]]]], k: int, adaptive: str, risk: float,
                 seed: int = 0) -> dict[str, Any]:
    """Items (id, n, samples in drawing order, at least k): the rule's stop against full Voting@k."""
    from grm_ray import voting
    from grm_ray.stages import item_seed

    sampler = sampler_for(k, adaptive, risk)
    used = changed = tok_total = tok_used = 0
    for item_id, n, seq in items:
        full = seq[:k]
        drawn = stop_after(full, n, k, sampler)
        used += drawn
        tok_total += sum(s.get("n_tokens", 1) for s in full)
        tok_used += sum(s.get("n_tokens", 1) for s in full[:drawn])
        tie_seed = item_seed(seed, item_id)
        changed += (voting.vote(full[:drawn], seed=tie_seed, n=n)["best_index"]
                    != voting.vote(full, seed=tie_seed, n=n)["best_index"])
    total = k * len(items)
    return {"items": len(items), "k": k, "rule": adaptive, "risk": risk if adaptive == "confident" else None,
            "winner_changed": changed / max(1, len(items)), "samples_saved": 1 - used / max(1, total),
            "tokens_saved": 1 - tok_used / max(1, tok_total), "fewer_samples": total / max(1, used)}


def grid(items: list[tuple[str, int, list[dict[str, Any]]]], ks: Sequence[int], seed: int = 0) -> list[dict]:
    out = []
    for k in ks:
        out.append(replay_items(items, k, "exact", 0.0, seed))
        out += [replay_items(items, k, "confident", r, seed) for r in RISKS]
    return out


def sim_items(scores: np.ndarray) -> list[tuple[str, int, list[dict[str, Any]]]]:
    """Simulated pairs as stored samples; the model has no position effect, the orders alternate."""
    return [(f"sim{i}", 2, [{"scores": [int(a), int(b)], "valid": True, "order": [t % 2, 1 - t % 2]}
                            for t, (a, b) in enumerate(row)]) for i, row in enumerate(scores)]


def stored_items(paths: Sequence[str]) -> tuple[list[tuple[str, int, list[dict[str, Any]]]], int, int]:
    """Scored outputs -> items (pairs and lists with >= 2 responses and no error), their seed and k."""
    from grm_ray.storage import read_table

    from grm_ray.evaluate import drawing_order, run_seed

    items, ks, seed = [], set(), 0
    for path in paths:
        table = read_table(path)
        seed = run_seed(table)
        for row in table.select(["id", "responses", "samples", "error"]).to_pylist():
            if row["error"] is None and row["samples"] and len(row["responses"]) > 1:
                n = len(row["responses"])
                items.append((row["id"], n, drawing_order(row["id"], n, row["samples"], seed)))
                ks.add(len(row["samples"]))
    return items, seed, min(ks) if ks else 0


def table_md(rows: list[dict[str, Any]]) -> str:
    out = ["| k | rule | risk | items | winner changed | samples saved | tokens saved | k / samples used |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['k']} | {r['rule']} | {r['risk'] if r['risk'] is not None else '-'} | {r['items']} | "
                   f"{r['winner_changed']:.2%} | {r['samples_saved']:.1%} | {r['tokens_saved']:.1%} | "
                   f"{r['fewer_samples']:.2f}x |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sim", help="simulation fitted to the paper's Voting@1/8/32")
    s.add_argument("--items", type=int, default=10000)
    s.add_argument("--fit", action="store_true", help="refit the item model (else the stored FITTED values)")
    r = sub.add_parser("replay", help="replay the rule on stored full-k runs (adaptive off)")
    r.add_argument("scored", nargs="+")
    args = p.parse_args()
    if args.cmd == "sim":
        params = fit() if args.fit else FITTED
        scores = simulate(args.items, max(KS), params, seed=0)
        acc = voting_accuracy(scores)
        rows = grid(sim_items(scores), KS)
        result = {"params": params, "items": args.items, "voting_accuracy": acc, "paper": PAPER_RB, "rows": rows}
        common.save_results("confident_sim", result)
        print("params", params, "\nVoting@1/8/32 simulated", {j: round(100 * a, 1) for j, a in acc.items()},
              "paper", {j: 100 * a for j, a in PAPER_RB.items()})
    else:
        items, seed, k = stored_items(args.scored)
        rows = grid(items, [kk for kk in KS if kk <= k] or [k], seed)
        common.save_results("confident_replay", {"runs": args.scored, "items": len(items), "k": k, "rows": rows})
    print(table_md(rows))


if __name__ == "__main__":
    main()
