"""One GRMEngine in a subprocess, driven by JSON commands on stdin (one per line, one answer per line).

Why a subprocess: vLLM's prefix-cache counters are process-wide and reset by a later engine, and a plain
`vllm.LLM` in its own process is the "plain script" of the overhead ratio. Everything the engine prints goes
to stderr (the worker log); stdout carries only the answers.

Commands: init(cfg), stage(...), prefix(...), prompt_tokens(...), quit().
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
import zlib
from typing import Any

ENGINE: Any = None
CFG: Any = None


def init(cfg: dict[str, Any]) -> dict[str, Any]:
    global ENGINE, CFG
    from grm_ray.config import JobConfig
    from grm_ray.engines import GRMEngine

    t0 = time.perf_counter()
    CFG = JobConfig(**cfg)
    ENGINE = GRMEngine(CFG)
    from bench.timed import warm_up

    warm = warm_up(ENGINE)  # as the pipeline side does before its clock starts (bench/timed.py)
    import torch

    return {"start_seconds": round(time.perf_counter() - t0, 2), "warmup_seconds": round(warm, 2),
            "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "vllm_multiprocessing": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1 (default)"),
            "pid": os.getpid(), "max_prompt_tokens": ENGINE.max_prompt_tokens,
            "block_size": ENGINE.block_size}


def _rows(input: str):
    """Read and normalise an input file exactly as the pipeline's read step does."""
    import pyarrow.parquet as pq
    from grm_ray.schema import detect_format
    from grm_ray.stages import Normalize

    table = pq.read_table(input)
    name = os.path.basename(input)
    return Normalize(CFG)(table, name, list(range(table.num_rows)), detect_format(table.column_names))


def _tree_cpu() -> float:
    """CPU seconds so far of this process and its children (AsyncLLM's engine core runs in a child)."""
    import psutil

    total = 0.0
    for proc in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def _stats_delta(before: dict[str, int]) -> dict[str, int]:
    after = ENGINE.prefix_cache_stats()
    return {k: after[k] - before[k] for k in after}


def stage(input: str, overrides: dict[str, Any] | None = None, batch_size: int | None = None,
          reset_cache: bool = True, return_samples: bool = False) -> dict[str, Any]:
    """Normalize + GRMSampler over the input, all rows in one call or in batches of `batch_size`; timed.

    The engine's own settings (model, temperature, max tokens, seed, structured) come from init's config;
    `overrides` may change what the stage reads: k, adaptive, risk.
    """
    from grm_ray.config import JobConfig
    from grm_ray.stages import GRMSampler, apply

    cfg = JobConfig(**{**CFG.public(), **(overrides or {})})
    table = _rows(input)
    sampler = GRMSampler(cfg, ENGINE)
    if reset_cache:
        ENGINE.reset_prefix_cache()  # each timed pass starts cold, as a fresh pipeline actor does
    before = ENGINE.prefix_cache_stats()
    step = batch_size or table.num_rows
    from bench.common import cpu_delta, machine_cpu

    m0, tree0 = machine_cpu(), _tree_cpu()
    t0, c0, th0 = time.perf_counter(), time.process_time(), time.thread_time()
    parts, call_seconds = [], []
    for s in range(0, table.num_rows, step):
        tc = time.perf_counter()
        parts.append(apply(sampler, table.slice(s, step)))
        call_seconds.append(round(time.perf_counter() - tc, 3))
    seconds, cpu, thread_cpu = time.perf_counter() - t0, time.process_time() - c0, time.thread_time() - th0
    machine = cpu_delta(m0, machine_cpu())
    samples = [s for p in parts for s in p.column("samples").to_pylist()]
    ids = [i for p in parts for i in p.column("id").to_pylist()]
    errors = [e for p in parts for e in p.column("error").to_pylist()]
    flat = [x for ss in samples for x in ss or []]
    out = {"seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3), "thread_cpu_seconds": round(thread_cpu, 3),
           "tree_cpu_seconds": round(_tree_cpu() - tree0, 2),  # with the engine-core child: AsyncLLM's model
           # everyone's CPU on the machine meanwhile, minus this process: the competition for the cores
           "machine_busy_others": round(machine.get("busy", cpu) - cpu, 2), "machine_steal": machine.get("steal"),
           "rows": table.num_rows, "call_seconds": call_seconds, "calls": math_ceil(table.num_rows, step),
           "samples": len(flat), "valid": sum(x["valid"] for x in flat),
           "repaired": sum(x["repaired"] for x in flat), "tokens": sum(x["n_tokens"] for x in flat),
           "error_rows": sum(e is not None for e in errors), "prefix_cache": _stats_delta(before)}
    if return_samples:
        out["items"] = [
            {"id": i, "error": e, "samples": [
                {"order": x["order"], "scores": x["scores"], "valid": x["valid"], "n_tokens": x["n_tokens"],
                 "text_crc": zlib.crc32(x["text"].encode())} for x in ss or []]}
            for i, e, ss in zip(ids, errors, samples)]
    return out


def math_ceil(a: int, b: int) -> int:
    return -(-a // b)


def prefix(items: list[dict[str, Any]], k: int, mode: str) -> dict[str, Any]:
    """k samples per item over balanced orderings; timed, with prompt tokens sent and cache counters.

    mode "shared": one request per ordering with n = its count (GRMEngine.sample, the product's call).
    mode "independent": one n=1 request per sample, request i of an ordering seeded seed + i: the seed vLLM
    gives the i-th child of an n-request. Where the engine honours per-request seeds (GPU; on CPU GRMEngine
    leaves them out, see grm_ray/engines.py) both modes draw the same samples; either way they decode the
    same number of samples of the same prompts. Both go through GRMEngine.sample.
    """
    from grm_ray import prompts

    reqs = []  # (rendered prompt, count, n responses, seed)
    for it in items:
        n = len(it["responses"])
        for order, c in prompts.orderings(n, k):
            text = ENGINE.render(prompts.render_grm_prompt(it["messages"], [it["responses"][j] for j in order]))
            reqs.append((text, c, n, zlib.crc32(text.encode()) % 2**30))
    lengths = ENGINE.count_tokens([r[0] for r in reqs])
    if mode == "shared":
        call = ([r[0] for r in reqs], [r[1] for r in reqs], [r[2] for r in reqs], [r[3] for r in reqs])
    elif mode == "independent":
        flat = [(text, 1, n, seed + i) for text, c, n, seed in reqs for i in range(c)]
        call = tuple([f[j] for f in flat] for j in range(4))
    else:
        raise ValueError(f"mode must be shared or independent, not {mode!r}")
    sent = sum(ENGINE.count_tokens(call[0]))
    ENGINE.reset_prefix_cache()
    before = ENGINE.prefix_cache_stats()
    t0 = time.perf_counter()
    gens = ENGINE.sample(call[0], call[1], call[2], seeds=call[3])
    tokens = sum(g.n_tokens for gs in gens for g in gs)
    seconds = time.perf_counter() - t0
    stats = _stats_delta(before)
    caching = bool(ENGINE.llm.vllm_config.cache_config.enable_prefix_caching)
    # Tokens the engine actually ran through the model for prompts. With caching on, vLLM counts every
    # request's prompt as looked up (queries) and the part served from cache (hits). With caching off
    # nothing is looked up and every request computes its whole prompt (an n-request fans out into n).
    per_sample = sum(length * r[1] for length, r in zip(lengths, reqs))
    computed = stats["queries"] - stats["hits"] if caching else per_sample
    return {"seconds": round(seconds, 3), "requests": len(call[0]), "prompt_tokens_per_sample": per_sample,
            "prompt_tokens_sent": sent, "prompt_tokens_computed": computed, "generated_tokens": tokens,
            "prefix_cache": stats, "caching": caching}


def prompt_tokens(input: str) -> dict[str, Any]:
    """Rendered GRM prompt length per ordering, over an input file (for the scale table)."""
    from grm_ray import prompts

    table = _rows(input).to_pylist()
    texts = [ENGINE.render(prompts.render_grm_prompt(r["messages"], r["responses"])) for r in table]
    lengths = ENGINE.count_tokens(texts)
    return {"mean": sum(lengths) / len(lengths), "min": min(lengths), "max": max(lengths), "n": len(lengths)}


COMMANDS = {"init": init, "stage": stage, "prefix": prefix, "prompt_tokens": prompt_tokens}


def main() -> None:
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else written to stdout (vLLM logs, C libraries) goes to the log
    sys.stdout = sys.stderr
    for line in sys.stdin:
        req = json.loads(line)
        if req["cmd"] == "quit":
            answers.write(json.dumps({"ok": True, "result": None}) + "\n")
            break
        try:
            result = COMMANDS[req["cmd"]](**req.get("args", {}))
            answers.write(json.dumps({"ok": True, "result": result}, default=str) + "\n")
        except Exception as e:  # noqa: BLE001 - reported to the parent, which raises
            traceback.print_exc()
            answers.write(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}) + "\n")
    answers.flush()


if __name__ == "__main__":
    main()
