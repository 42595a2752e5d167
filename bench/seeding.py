"""What seeded sampling costs on CPU: the product's engine (every request seeded, chunked prefill off, which
vLLM 0.32 on CPU needs for seeded requests) against the same engine unseeded with chunked prefill on.

    python -m bench.seeding [--items 8] [--k 4] [--max-tokens 96] [--repeats 2]

Each side runs in its own fresh process (vLLM's settings are per engine), alternating A B A B, on the demo
model with the demo's structured three-line output; each pass starts from a cold prefix cache after a
one-item warm-up. Prints tokens per second per pass and product / baseline of the means.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def one_pass(side: str, items: int, k: int, max_tokens: int) -> float:
    """In this process: build the engine of `side`, sample every item once; generated tokens per second."""
    import pyarrow.parquet as pq

    from grm_ray import engines
    from grm_ray.demo import demo_config
    from grm_ray.schema import detect_format
    from grm_ray.stages import GRMSampler, Normalize, apply

    cfg = demo_config("/tmp/grm-ray-bench/seeding-out", items, k).model_copy(update={"max_tokens": max_tokens})
    if side == "baseline":
        cfg = cfg.model_copy(update={"engine_kwargs": {**cfg.engine_kwargs, "enable_chunked_prefill": True}})
        asample = engines.GRMEngine.asample
        engines.GRMEngine.asample = lambda self, p, ns, nr, seeds=None: asample(self, p, ns, nr, None)
    engine = engines.GRMEngine(cfg)
    sampler = GRMSampler(cfg, engine=engine)
    raw = pq.read_table(cfg.input)
    table = Normalize(cfg)(raw, "demo", range(raw.num_rows), detect_format(raw.column_names))
    apply(sampler, table.slice(0, 1))  # warm-up: the structured-output backend's first use
    engine.reset_prefix_cache()
    t0 = time.perf_counter()
    out = apply(sampler, table)
    seconds = time.perf_counter() - t0
    return sum(s["n_tokens"] for ss in out.column("samples").to_pylist() for s in ss or []) / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=8)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--side", choices=["product", "baseline"], help=argparse.SUPPRESS)  # one pass, in a child
    args = p.parse_args()
    if args.side:
        print(json.dumps(one_pass(args.side, args.items, args.k, args.max_tokens)))
        return
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1"}
    rates: dict[str, list[float]] = {"baseline": [], "product": []}
    for _ in range(args.repeats):
        for side in rates:
            out = subprocess.run([sys.executable, "-m", "bench.seeding", "--side", side, "--items", str(args.items),
                                  "--k", str(args.k), "--max-tokens", str(args.max_tokens)],
                                 env=env, capture_output=True, text=True, check=True)
            rates[side].append(round(json.loads(out.stdout.strip().splitlines()[-1]), 1))
            print(f"[seeding] {side}: {rates[side][-1]} tokens/s", flush=True)
    mean = {side: sum(v) / len(v) for side, v in rates.items()}
    print(json.dumps({"tokens_per_second": rates, "product_over_baseline": round(mean["product"] / mean["baseline"], 3)}))


if __name__ == "__main__":
    main()
