"""5. The race: grm-ray's GRM stage against ray.data.llm's recipe, on the same items, in one Ray session.

Both sides sample k critiques per item from the same model, engine arguments (prefix caching on, the
product's CPU settings), token-id prompts (the same rendered GRM prompts, the same balanced orderings),
temperature, max_tokens, and structured decoding to the same score regex (`--free`: unstructured, where a
model that never ends its critique makes grm-ray repair every sample and the other side return it unparsed):

- grm-ray: the pipeline's GRM stage actor (pipeline._StageActor over GRMSampler: one request per ordering
  with n = its samples, repairs of cut samples, max_batches_in_flight batches at once on the async engine);
- ray.data.llm: `build_processor(vLLMEngineProcessorConfig(...))` over k rows per item with n=1 each (its
  vLLM stage keeps one output of n; its maintainers' advice, ray-project/ray#53396), max_concurrent_batches
  as grm-ray's batches in flight, the same batch size in samples.

Measured per side: items per second over the engine stage's working span (first call start to last call end,
stamped inside the actor by bench/race_hook.py, so engine start-up is left out of both) and engine CPU-seconds per item (CPU time of the engine actor
processes and their vLLM engine-core children over the same span; GPU-seconds on a GPU are wall x GPUs).
grm-ray also repairs samples cut at max_tokens (extra tokens the other side does not generate): generated
tokens, valid (parseable) samples and repairs are reported beside the rate. `--adaptive confident` adds a
third side, grm-ray stopping decided items early (ray.data.llm has no such stop: it always draws k).

    python -m bench.race --model demo --items 24 --ks 8 32 --max-tokens 160 --adaptive confident  # CPU
    python -m bench.race --full --model BBQGOD/DeepSeek-GRM-27B --max-model-len 4096 --ks 8 32  # one GPU node
"""
from __future__ import annotations

import argparse
import json
import os
import threading
import time
from typing import Any

import psutil

from bench import common


class CpuMeter:
    """Samples the CPU time of engine processes (Ray MapWorker actors and their children) every 0.2 s, so the
    CPU of processes that exit is kept; `at(t)` is their summed CPU seconds at time t (linear in between)."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self.seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _engine_pids(self) -> list[psutil.Process]:
        procs = []
        for p in psutil.Process().children(recursive=True):
            try:
                if "MapWorker" in " ".join(p.cmdline()[:3]) or "MapWorker" in p.name():
                    procs.append(p)
                    procs.extend(p.children(recursive=True))
            except psutil.Error:
                pass
        return procs

    def _run(self) -> None:
        while not self._stop.is_set():
            for p in self._engine_pids():
                try:
                    t = p.cpu_times()
                    self.seen[p.pid] = max(self.seen.get(p.pid, 0.0), t.user + t.system)
                except psutil.Error:
                    pass
            self.samples.append((time.time(), sum(self.seen.values())))
            time.sleep(0.2)

    def at(self, t: float) -> float:
        before = [c for ts, c in self.samples if ts <= t]
        return before[-1] if before else 0.0

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_side(ds: Any, n_items: int, per_row_items: float, tokens_of, meter: "CpuMeter",
             counts_of=lambda r: (0, 0, 0)) -> dict[str, float]:
    """Consume ds (one side on n_items): the engine stage's working span (first call start to last call end,
    stamped in the actor by bench/race_hook.py: engine start-up excluded), tokens, engine CPU in that span."""
    from bench import race_hook

    import collections

    t0 = time.time()
    got: collections.Counter = collections.Counter()
    tokens, counts = 0, [0, 0, 0]  # samples, valid (a parseable score), repaired
    for r in ds.iter_rows():
        got[r["item"]] += 1
        tokens += tokens_of(r)
        counts = [a + b for a, b in zip(counts, counts_of(r))]
    t1 = time.time()
    time.sleep(0.5)  # one more CPU sample of the engine processes before they go
    assert len(got) == n_items and all(c * per_row_items == 1 for c in got.values()), (len(got), got)
    path = os.environ[race_hook.STAMPS_ENV]
    busy = race_hook.span(path, t0, t1)
    with open(path) as f:
        first = min(json.loads(x)["t"] for x in f if x.strip() and t0 <= json.loads(x)["t"] <= t1)
    return {"wall_s": t1 - t0, "busy_s": busy, "tokens": tokens, "samples": counts[0], "valid": counts[1],
            "repaired": counts[2],
            "items_per_s": n_items / busy, "engine_cpu_s": meter.at(first + busy) - meter.at(first)}


def grm_side(cfg: Any, table: Any) -> Any:
    import ray

    from grm_ray import pipeline
    from grm_ray.stages import GRMSampler

    return ray.data.from_arrow(table).map_batches(
        pipeline._StageActor, fn_constructor_kwargs={"stage_cls": GRMSampler, "cfg": cfg},
        batch_size=cfg.batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=1, max_concurrent_calls_per_actor=cfg.max_batches_in_flight),
        **pipeline.engine_resources(cfg))


def rdl_rows(cfg: Any, rows: list[dict[str, Any]], tokenizer_engine: Any) -> list[dict[str, Any]]:
    """k rows per item, n=1 each: the same prompts (token ids) and orderings as grm-ray's requests."""
    from grm_ray import prompts
    from grm_ray.stages import item_seed

    out = []
    for r in rows:
        n = len(r["responses"])
        for order, count in prompts.orderings(n, cfg.k, seed=item_seed(cfg.seed, r["id"])):
            text = tokenizer_engine.render(prompts.render_grm_prompt(r["messages"], [r["responses"][j] for j in order]))
            ids = tokenizer_engine.encode([text])[0]
            base = item_seed(cfg.seed, f"{r['id']}/0/{order}")
            out.extend({"item": r["id"], "tokenized_prompt": ids, "seed": base + j, "n_responses": n}
                       for j in range(count))
    return out


def rdl_side(cfg: Any, krows: list[dict[str, Any]]) -> Any:
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from grm_ray import pipeline
    from grm_ray.engines import llm_kwargs

    kw = llm_kwargs(cfg, cfg.model, disable_log_stats=True, structured_outputs_config={"backend": "guidance"})
    kw.pop("model")
    if not common.has_gpu():
        kw["enable_chunked_prefill"] = False  # as GRMEngine on CPU (seeded requests)
    res = pipeline.engine_resources(cfg)
    config = vLLMEngineProcessorConfig(
        model_source=cfg.model, engine_kwargs=kw, batch_size=cfg.batch_size * cfg.k, concurrency=1,
        max_concurrent_batches=cfg.max_batches_in_flight,
        runtime_env=res.get("runtime_env"),
        placement_group_config=None if res["num_gpus"] else {"bundles": [{"CPU": cfg.cpus_per_actor}]},
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False)
    temperature, top_p, max_tokens, structured = cfg.temperature, cfg.top_p, cfg.max_tokens, cfg.structured

    def preprocess(r: dict[str, Any]) -> dict[str, Any]:
        params = {"n": 1, "temperature": temperature, "top_p": top_p, "max_tokens": max_tokens, "seed": int(r["seed"])}
        if structured:  # the same regex as grm-ray's structured samples
            from grm_ray.parsing import score_regex

            params["structured_outputs"] = {"regex": score_regex(int(r["n_responses"]), max_tokens)}
        return {"item": r["item"], "tokenized_prompt": r["tokenized_prompt"], "sampling_params": params,
                "n_responses": r["n_responses"]}

    def postprocess(r: dict[str, Any]) -> dict[str, Any]:
        from grm_ray.parsing import parse_scores

        return {"item": r["item"], "n_tokens": int(r["num_generated_tokens"]),
                "valid": parse_scores(r["generated_text"], int(r["n_responses"])) is not None}

    processor = build_processor(config, preprocess=preprocess, postprocess=postprocess)
    return processor(ray.data.from_items(krows))


def tokenizer(cfg: Any) -> Any:
    """GRMEngine's render/encode with the model's tokenizer only (no engine): prompts as grm-ray sends them."""
    from transformers import AutoTokenizer

    from grm_ray import prompts
    from grm_ray.engines import GRMEngine

    local = GRMEngine.__new__(GRMEngine)
    local.cfg, local.tokenizer = cfg, AutoTokenizer.from_pretrained(cfg.model)
    local._add_special = prompts.special_tokens(local.tokenizer)
    return local


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import pyarrow.parquet as pq
    import ray

    from grm_ray.schema import detect_format
    from grm_ray.stages import Normalize

    items = common.pick(args.items, 16, 256, args.full)
    max_tokens = common.pick(args.max_tokens, 64, 1024, args.full)
    inp = common.input_file(args, items)
    results: dict[str, Any] = {"settings": {"items": items, "max_tokens": max_tokens, "model": args.model,
                                            "free_decoding": args.free, "adaptive": args.adaptive,
                                            "machine": common.machine()}}
    from bench import race_hook

    stamps = os.path.join(args.workdir, "race-stamps.jsonl")
    os.environ[race_hook.STAMPS_ENV] = stamps
    env = {k: v for k, v in common.engine_env(args.threads).items()
           if k in ("PYTHONPATH", "HF_HUB_OFFLINE", "OMP_NUM_THREADS")}
    ray.init(num_cpus=max(4, (psutil.cpu_count() or 2) + 2), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {**env, race_hook.STAMPS_ENV: stamps},
                          "worker_process_setup_hook": "bench.race_hook.setup"})
    meter = CpuMeter()
    try:
        for k in args.ks:
            common.FREE[0] = args.free
            cfg = common.job_config(args.model, args.workdir, input=inp, output="", k=k, max_tokens=max_tokens,
                                    max_model_len=args.max_model_len, threads=args.threads,
                                    batch_size=args.batch_size or (8 if not args.full else 64),
                                    max_batches_in_flight=args.in_flight)
            raw = pq.read_table(inp)
            table = Normalize(cfg)(raw, "race", list(range(raw.num_rows)), detect_format(raw.column_names))
            rows = table.select(["id", "messages", "responses"]).to_pylist()
            krows = rdl_rows(cfg, rows, tokenizer(cfg))
            figures: dict[str, Any] = {}
            sides = list(args.order) + ([f"grm-ray adaptive={args.adaptive}"] if args.adaptive else [])
            for side in sides:
                if side.startswith("grm-ray"):
                    side_cfg = cfg.model_copy(update={"adaptive": args.adaptive}) if "adaptive" in side else cfg
                    ds = grm_side(side_cfg, table).map(lambda r: {"item": r["id"], "samples": r["samples"]})
                    per_row, tokens_of = 1.0, lambda r: sum(s["n_tokens"] for s in r["samples"] or [])  # noqa: E731
                    counts_of = lambda r: (len(r["samples"] or []), sum(s["valid"] for s in r["samples"] or []),  # noqa: E731
                                           sum(s["repaired"] for s in r["samples"] or []))
                else:
                    ds = rdl_side(cfg, krows)
                    per_row, tokens_of = 1.0 / k, lambda r: r["n_tokens"]  # noqa: E731
                    counts_of = lambda r: (1, int(r["valid"]), 0)  # noqa: E731
                r = run_side(ds, items, per_row, tokens_of, meter, counts_of)
                r["engine_cpu_s_per_item"] = r["engine_cpu_s"] / items
                figures[side] = r
                print(f"[race] k={k} {side}: {r['items_per_s']:.3f} items/s over the engine's working span "
                      f"{r['busy_s']:.1f} s, {r['engine_cpu_s_per_item']:.2f} engine CPU-s/item, {r['tokens']} tokens, "
                      f"{r['valid']}/{r['samples']} samples valid ({r['repaired']} repaired); "
                      f"wall incl. start-up {r['wall_s']:.1f} s", flush=True)
            d = figures.get("ray.data.llm")
            for side in (x for x in sides if x.startswith("grm-ray") and d):
                g, tag = figures[side], side.replace("grm-ray", "").strip()
                g["items_per_s_ratio"] = g["items_per_s"] / d["items_per_s"]
                g["cpu_per_item_ratio"] = g["engine_cpu_s_per_item"] / max(1e-9, d["engine_cpu_s_per_item"])
                g["valid_per_item_ratio"] = g["valid"] / max(1, d["valid"])
                print(f"[race] k={k}: grm-ray{' ' + tag if tag else ''} / ray.data.llm items/s "
                      f"{g['items_per_s_ratio']:.2f}, engine CPU per item {g['cpu_per_item_ratio']:.2f}, "
                      f"valid samples {g['valid_per_item_ratio']:.2f}", flush=True)
            results[f"k{k}"] = figures
    finally:
        meter.stop()
        ray.shutdown()
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.set_defaults(model="tiny")
    p.add_argument("--ks", type=int, nargs="+", default=[8, 32], help="samples per item, one race each")
    p.add_argument("--batch-size", type=int, default=None, help="grm-ray items per batch (ray.data.llm: x k rows)")
    p.add_argument("--in-flight", type=int, default=4, help="batches in flight per engine actor, both sides")
    p.add_argument("--order", nargs="+", default=["grm-ray", "ray.data.llm"], help="sides, in this order")
    p.add_argument("--adaptive", choices=["exact", "confident"], default=None,
                   help="also race grm-ray with this early stop (a third side, after the others)")
    args = p.parse_args()
    res = measure(args)
    common.save_results("race", res)
    print(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
