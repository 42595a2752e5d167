"""2. Prefix sharing: prompt tokens computed and wall time, balanced orderings with n vs k independent requests.

For pairs and lists of 4, at k = 8 and 32, the same items and k samples go to two engines:
- shared: prefix caching on (the product's setting); one request per balanced ordering with n = its count
  (GRMEngine.sample, the product's call).
- independent: prefix caching off; k requests with n = 1, request i of an ordering seeded seed + i (the seed
  vLLM gives the i-th child of an n-request), so both sides decode the same samples where the engine honours
  per-request seeds (GPU); on CPU the same number of samples (the generated-tokens ratio shows it).
Prompt tokens computed = vLLM's prefix-cache queries - hits (caching on); with caching off every request
computes its whole prompt. Two more cells (independent with caching on, shared with caching off) separate
what the cache does from what n does. Each engine runs in its own worker process (vLLM's counters are
process-wide); on CPU both stay up and the measurements alternate, repeated, so load drift hits both sides;
each cell's wall time is its fastest repeat.

The default model here is the tiny random Llama (structured decoding off, so every sample runs to max
tokens): prompt-token accounting does not depend on the model, wall time does (see RESULTS.md).

    python -m bench.prefix [--prefix-model tiny|demo|NAME] [--k 8] [--items 16] [--max-tokens 64]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from bench import common


def settings(args: argparse.Namespace) -> dict[str, Any]:
    model = args.prefix_model or ("tiny" if not args.full else args.model)
    return {"model_kind": model, "items": common.pick(args.items, 16, 256, args.full),
            "ks": [args.k] if args.k else [8, 32],
            "max_tokens": common.pick(args.max_tokens, 64, 1024, args.full),
            "repeats": common.pick(getattr(args, "repeats", None), 2, 1, args.full),
            "structured": bool(getattr(args, "structured", False))}


def item_sets(args: argparse.Namespace, n_items: int) -> dict[str, list[dict[str, Any]]]:
    """{'pairs': [...], 'lists of 4': [...]}: the packaged rows, or --input rows with 2 and 4 responses."""
    if not args.input:
        return {"pairs": common.make_items(n_items, 2), "lists of 4": common.make_items(n_items, 4)}
    import pyarrow.parquet as pq
    from grm_ray.schema import detect_format, normalize

    table = pq.read_table(args.input)
    fmt = detect_format(table.column_names)
    rows = [normalize(r, fmt, 16) for r in table.to_pylist()]
    sets = {"pairs": [r for r in rows if len(r["responses"]) == 2][:n_items],
            "lists of 4": [r for r in rows if len(r["responses"]) == 4][:n_items]}
    return {name: items for name, items in sets.items() if items}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    s = settings(args)
    wd = Path(args.workdir)
    cfg_on = common.job_config(s["model_kind"], wd, input="", output="", k=max(s["ks"]), max_tokens=s["max_tokens"],
                               max_model_len=args.max_model_len, threads=args.threads, structured=s["structured"])
    if getattr(args, "prefix_block_size", None):
        cfg_on = cfg_on.model_copy(update={"engine_kwargs": {**cfg_on.engine_kwargs, "block_size": args.prefix_block_size}})
    cfg_off = cfg_on.model_copy(update={"engine_kwargs": {**cfg_on.engine_kwargs, "enable_prefix_caching": False}})
    env = common.engine_env(args.threads)
    sets = item_sets(args, s["items"])
    gpu = common.has_gpu()
    warm = next(iter(sets.values()))[:2]
    cells: dict[str, dict[str, Any]] = {}

    def run(w: common.Worker, side: str, name: str, k: int, mode: str) -> None:
        r = w.call("prefix", items=sets[name], k=k, mode=mode)
        key = f"{name} k={k}"
        cell = cells.setdefault(key, {}).setdefault(side, {"runs": []})
        cell["runs"].append(r)

    plan = [(name, k) for name in sets for k in s["ks"]]
    sides = [("shared, caching on", "on", "shared"), ("independent, caching off", "off", "independent"),
             ("independent, caching on", "on", "independent"), ("shared, caching off", "off", "shared")]
    if not gpu:  # both engines up at once; alternate which goes first
        with common.Worker("prefix-cache-on", cfg_on, env, wd) as w_on, \
                common.Worker("prefix-cache-off", cfg_off, env, wd) as w_off:
            workers = {"on": w_on, "off": w_off}
            for w in workers.values():
                w.call("prefix", items=warm, k=2, mode="shared")  # warm-up, untimed
            for rep in range(s["repeats"]):
                for name, k in plan:
                    order = sides if rep % 2 == 0 else [sides[1], sides[0], sides[3], sides[2]]
                    for side, which, mode in order:
                        run(workers[which], side, name, k, mode)
                print(f"[prefix] repeat {rep + 1}/{s['repeats']} done", flush=True)
            info = {"on": w_on.info, "off": w_off.info}
    else:  # one engine at a time on the device
        info = {}
        for which, cfg in (("on", cfg_on), ("off", cfg_off)):
            with common.Worker(f"prefix-cache-{which}", cfg, env, wd) as w:
                w.call("prefix", items=warm, k=2, mode="shared")
                info[which] = w.info
                for _ in range(s["repeats"]):
                    for name, k in plan:
                        for side, wh, mode in sides:
                            if wh == which:
                                run(w, side, name, k, mode)
    table = []
    for key, c in cells.items():
        # Wall time: the fastest repeat. Other users' load only ever adds time, and it comes in bursts.
        agg = {side: {"seconds": min(r["seconds"] for r in v["runs"]),
                      "prompt_tokens_computed": v["runs"][0]["prompt_tokens_computed"],
                      "prompt_tokens_per_sample": v["runs"][0]["prompt_tokens_per_sample"],
                      "requests": v["runs"][0]["requests"],
                      "generated_tokens": v["runs"][0]["generated_tokens"],
                      "computed_all_runs": [r["prompt_tokens_computed"] for r in v["runs"]],
                      "seconds_all_runs": [r["seconds"] for r in v["runs"]]} for side, v in c.items()}
        a, b = agg["shared, caching on"], agg["independent, caching off"]
        table.append({"case": key, "cells": agg,
                      "computed_ratio": a["prompt_tokens_computed"] / b["prompt_tokens_computed"],
                      "wall_ratio": a["seconds"] / b["seconds"],
                      "cache_alone_computed_ratio": agg["independent, caching on"]["prompt_tokens_computed"]
                      / b["prompt_tokens_computed"],
                      "cache_alone_wall_ratio": agg["independent, caching on"]["seconds"] / b["seconds"],
                      "n_without_cache_wall_ratio": agg["shared, caching off"]["seconds"] / b["seconds"],
                      "same_generated_tokens": a["generated_tokens"] == b["generated_tokens"],
                      # the same seeds; bf16 results vary slightly with the batch's shape, so a sample may
                      # end (EOS) a little earlier or later: the decode work is equal within this ratio
                      "generated_tokens_ratio": a["generated_tokens"] / b["generated_tokens"]})
        print(f"[prefix] {key}: computed {table[-1]['computed_ratio']:.3f}, wall {table[-1]['wall_ratio']:.3f}",
              flush=True)
    # Computed prompt tokens grow with k by a fixed amount per sample: the last, partial cache block of each
    # prompt, which every sample recomputes. Slope between the smallest and largest k, per item and sample.
    tails = {}
    if len(s["ks"]) > 1:
        lo, hi = min(s["ks"]), max(s["ks"])
        for name in sets:
            a = next(t for t in table if t["case"] == f"{name} k={lo}")["cells"]["shared, caching on"]
            b = next(t for t in table if t["case"] == f"{name} k={hi}")["cells"]["shared, caching on"]
            tails[name] = (b["prompt_tokens_computed"] - a["prompt_tokens_computed"]) / ((hi - lo) * len(sets[name]))
    return {"tail_per_extra_sample": tails, "settings": {**s, "model": cfg_on.model, "engine_kwargs_on": cfg_on.engine_kwargs,
                         "engine_kwargs_off": cfg_off.engine_kwargs, "threads": args.threads, "gpu": gpu},
            "engines": info, "table": table}


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefix-model", default=None,
                   help="model for this measurement: 'tiny' (default, quick), 'demo' or a name/path (default --model with --full)")
    p.add_argument("--repeats", type=int, default=None, help="alternating repeats per cell (default 2 on CPU)")
    p.add_argument("--structured", action="store_true", help="structured decoding on (default off here)")
    p.add_argument("--prefix-block-size", type=int, default=None,
                   help="vLLM KV block size for both engines (default vLLM's: 128 on CPU, 16 on GPU)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    add_args(p)
    args = p.parse_args()
    result = measure(args)
    result["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    # the default measurement is section "prefix"; variants get their own, so they do not overwrite it
    variant = "".join([f"_block{args.prefix_block_size}" if args.prefix_block_size else "",
                       f"_{Path(args.prefix_model).name}" if args.prefix_model and args.prefix_model != "tiny" else ""])
    common.save_results("prefix" + variant, result)
    print(json.dumps([{k: r[k] for k in ("case", "computed_ratio", "wall_ratio", "generated_tokens_ratio")}
                      for r in result["table"]], indent=2))


if __name__ == "__main__":
    main()
