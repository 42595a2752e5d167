"""3. Adaptive sampling: `--adaptive exact` against full k, and `--adaptive confident` replayed.

Live: the GRMSampler stage on a real GRMEngine (one engine, no Ray), same items and seed, adaptive off
(full k) then exact, each from a cold prefix cache: generated tokens, wall time, and each item's plain-vote
winner. The two runs draw different samples (adaptive rounds are seeded per round on GPU; on CPU the engine
does not seed requests), so a live winner may differ where the full-k vote is close; the guarantee is
checked by the replay.

Replay: the full-k run's stored samples are fed back in the order the adaptive sampler draws them (sample t
has the order prompts.sample_order gives it; grm_ray.evaluate.drawing_order) and the stage's own stopping
rule (GRMSampler._done) decides after each round. Exact: the winner at the stop must equal the full-k
winner for every item. Confident: for each risk, the share of samples saved and of items whose winner
differs from full Voting@k. Replays at smaller k use the first k samples drawn in the same run.

    python -m bench.adaptive [--model demo] [--items 8] [--k 32] [--max-tokens 96]
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from typing import Any, Sequence

from bench import common

RISKS = (0.2, 0.1, 0.05, 0.01)


def settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"items": common.pick(args.items, 8, 256, args.full), "k": common.pick(args.k, 32, 32, args.full),
            "max_tokens": common.pick(args.max_tokens, 96, 1024, args.full)}


def winner(samples: Sequence[dict[str, Any]], n: int, item_id: str, seed: int) -> int | None:
    """The plain-vote winner, as the Vote stage computes it (seeded tie-break)."""
    from grm_ray import voting
    from grm_ray.stages import item_seed

    return voting.vote(samples, seed=item_seed(seed, item_id), n=n)["best_index"]


def replay_all(items: list[dict[str, Any]], ns: dict[str, int], k: int, cfg: Any, seed: int) -> dict[str, Any]:
    """Replay every item at k with cfg's adaptive rule; savings and winner changes against full Voting@k.

    Each item's samples are put in the order the sampler drew them (bench.confident.drawing_order); a
    replay at k below the run's k uses the first k of them, as a k-sample run would have drawn."""
    from bench.confident import replay_items
    from grm_ray.evaluate import drawing_order

    seqs = [(it["id"], ns[it["id"]], drawing_order(it["id"], ns[it["id"]], it["samples"], seed)) for it in items]
    r = replay_items(seqs, k, cfg.adaptive, cfg.risk, seed)
    return {"items": r["items"], "samples_saved": r["samples_saved"], "tokens_saved": r["tokens_saved"],
            "winner_changed": r["winner_changed"]}


def rule_frontier(k: int, risk: float) -> list[dict[str, Any]]:
    """Pairs: after m samples, the smallest vote lead at which each rule stops (the confident rule also
    depends on the spread: here the lead comes from samples of 10,1 and one remainder, the rest 5,5).

    Returns the states where the confident rule stops and the exact rule does not: m, the lead the
    confident rule needs, the lead exact needs (> 9 x remaining), both per sample. Empty: confident never
    stops before exact at this k and risk, whatever the samples say.
    """
    from grm_ray import voting

    out = []
    for m in range(2, k, 2):  # pairs: one balanced round = 2 samples
        for lead in range(0, 9 * m + 1):
            rows = [[10, 1]] * (lead // 9) + ([[1 + lead % 9, 1]] if lead % 9 else [])
            rows += [[5, 5]] * (m - len(rows))
            if voting.decided_confident(rows, k - m, risk):
                if not voting.decided_exact([sum(r[0] for r in rows), sum(r[1] for r in rows)], k - m):
                    out.append({"m": m, "confident_lead_per_sample": lead / m,
                                "exact_lead_per_sample": 9 * (k - m) / m})
                break
    return out


def measure(args: argparse.Namespace, worker: common.Worker | None = None, hint: bool = False,
            live_run: bool = True) -> dict[str, Any]:
    """Live exact vs full k (unless live_run is False) and the replays. hint=True appends the label hint
    ("The best response is: Response X", the paper's hinted sampling) to every prompt: a decisive score
    distribution from the same model, on which the stopping rules have something to stop."""
    from grm_ray.config import JobConfig

    s = settings(args)
    k = s["k"]
    inp = common.input_file(args, s["items"])
    cfg = common.job_config(args.model, args.workdir, input=inp, output="", k=k, max_tokens=s["max_tokens"],
                            max_model_len=args.max_model_len, threads=args.threads)
    own = worker is None
    w = worker or common.Worker("adaptive", cfg, common.engine_env(args.threads), args.workdir)
    print(f"[adaptive] full k={k} run{' (hinted)' if hint else ''} ...", flush=True)
    full = w.call("stage", input=inp, overrides={"k": k, "adaptive": "off", "hint": hint}, return_samples=True)
    exact = None
    if live_run:
        print(f"[adaptive] full run {full['seconds']:.0f} s; exact run ...", flush=True)
        exact = w.call("stage", input=inp, overrides={"k": k, "adaptive": "exact", "hint": hint},
                       return_samples=True)
    if own:
        w.close()

    import pyarrow.parquet as pq

    table = pq.read_table(inp)
    ns = {i: len(r) for i, r in zip(table.column("id").to_pylist(), table.column("responses").to_pylist())}
    ok = [it for it in full["items"] if it["error"] is None]
    live = _live(full, exact, ok, ns, cfg.seed) if exact else None
    base = cfg.public()
    base["hint"] = hint
    replays: dict[str, Any] = {"exact": {}, "confident": {}}
    for kk in sorted({8, k} if k >= 8 else {k}):
        replays["exact"][f"k={kk}"] = replay_all(ok, ns, kk, JobConfig(**{**base, "k": kk, "adaptive": "exact"}),
                                                 cfg.seed)
    for risk in RISKS:
        replays["confident"][f"risk={risk}"] = replay_all(
            ok, ns, k, JobConfig(**{**base, "k": k, "adaptive": "confident", "risk": risk}), cfg.seed)
    valid = [s for it in ok for s in it["samples"] if s["valid"]]
    hist: dict[str, int] = defaultdict(int)
    for s_ in valid:
        hist[",".join(map(str, s_["scores"]))] += 1
    exact_ok = all(r["winner_changed"] == 0 for r in replays["exact"].values())
    frontier = {f"k={kk} risk={risk}": rule_frontier(kk, risk) for kk in (8, 32, 64) for risk in RISKS}
    if live:
        print(f"[adaptive] live exact/full tokens {live['tokens_ratio']:.3f}, wall {live['wall_ratio']:.3f}", flush=True)
    print(f"[adaptive] replayed exact keeps every winner: {exact_ok}; exact saves "
          f"{replays['exact'][f'k={k}']['samples_saved']:.1%} of samples at k={k}", flush=True)
    return {"settings": {**s, "model": cfg.model, "structured": cfg.structured, "threads": args.threads,
                         "hint": hint, "engine": w.info},
            "live": live, "replay": replays, "replay_exact_keeps_every_winner": exact_ok, "rule_frontier": frontier,
            "score_patterns_top": sorted(hist.items(), key=lambda kv: -kv[1])[:8],
            "valid_share_full": full["valid"] / max(1, full["samples"])}


def _live(full: dict[str, Any], exact: dict[str, Any], ok: list[dict[str, Any]], ns: dict[str, int],
          seed: int) -> dict[str, Any]:
    from grm_ray import voting

    ex = {it["id"]: it for it in exact["items"]}
    diff = []
    for it in ok:
        a = winner(it["samples"], ns[it["id"]], it["id"], seed)
        b = winner(ex[it["id"]]["samples"], ns[it["id"]], it["id"], seed)
        if a != b:
            m = voting.vote(it["samples"], n=ns[it["id"]])
            diff.append({"id": it["id"], "full_winner": a, "exact_winner": b, "full_margin": m["margin"],
                         "full_tie": m["tie"]})
    keys = ("seconds", "cpu_seconds", "samples", "valid", "repaired", "tokens")
    return {"full": {k: full[k] for k in keys}, "exact": {k: exact[k] for k in keys},
            "tokens_ratio": exact["tokens"] / full["tokens"], "wall_ratio": exact["seconds"] / full["seconds"],
            "cpu_ratio": exact["cpu_seconds"] / full["cpu_seconds"], "samples_ratio": exact["samples"] / full["samples"],
            "items": len(ok), "winner_differs": len(diff), "differing_items": diff}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--hint", action="store_true", help="hinted prompts, replay only (section adaptive_hinted)")
    args = p.parse_args()
    result = measure(args, hint=args.hint, live_run=not args.hint)
    common.save_results("adaptive_hinted" if args.hint else "adaptive", result)
    print(json.dumps({"live": {k: v for k, v in (result["live"] or {}).items() if k != "differing_items"},
                      "replay": result["replay"]}, indent=2))


if __name__ == "__main__":
    main()
