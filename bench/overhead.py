"""1. Pipeline overhead: generated tokens/s of the full `grm-ray score` pipeline over a plain vllm.LLM's.

Both sides: the same JobConfig (model, k, max tokens, structured decoding, seed, engine arguments from
grm_ray.engines.llm_kwargs), the same input rows, the same threads (see bench/common.py), so the same
requests: prompts, orderings, SamplingParams and per-request seeds.

- plain: a GRMEngine in a worker subprocess, no Ray. The Ray-free GRMSampler stage (which calls
  GRMEngine.sample, plus its repair calls) runs over all items in ONE call (the best a script can do), and
  again in calls of batch_size items (what the pipeline's actor gets), each pass from a cold prefix cache.
  On CPU the plain passes run before AND after the pipeline, so drift of a shared machine's load shows.
- pipeline: `grm_ray.pipeline.run(cfg)` as `grm-ray score` runs it (local Ray, Ray Data read + Normalize
  tasks, the GRM actor, vote + commit tasks, the exactly-once check), with the GRM stage swapped for a
  subclass that timestamps engine readiness and each call (bench/timed.py).

Start-up is excluded from both: the plain side times generation only; the pipeline side counts from the
moment its actor's engine is ready to the return of run() (steady state). Start-up times are reported.

    python -m bench.overhead [--items 16 --k 4 --max-tokens 96 --model demo]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import common


def settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"items": common.pick(args.items, 16, 512, args.full), "k": common.pick(args.k, 4, 8, args.full),
            "max_tokens": common.pick(args.max_tokens, 96, 1024, args.full),
            "batch_size": common.pick(getattr(args, "batch_size", None), 8, 64, args.full)}


def make_config(args: argparse.Namespace, s: dict[str, Any]):
    inp = common.input_file(args, s["items"])
    return common.job_config(args.model, args.workdir, input=inp, output=str(Path(args.workdir) / "overhead-out"),
                             k=s["k"], max_tokens=s["max_tokens"], max_model_len=args.max_model_len,
                             threads=args.threads, batch_size=s["batch_size"])


def run_pipeline(cfg: Any, env: dict[str, str], workdir: str) -> dict[str, Any]:
    """The pipeline side in its own process (own Ray instance, shut down after)."""
    wd = Path(workdir)
    cfg_path, timings = wd / "overhead-pipeline-cfg.json", wd / "overhead-pipeline-timings.jsonl"
    cfg_path.write_text(json.dumps(cfg.public()))
    timings.unlink(missing_ok=True)
    log = wd / "logs" / "overhead-pipeline.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    from bench.timed import TIMINGS_ENV

    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "bench.overhead", "--pipeline-side", str(cfg_path)],
                              cwd=common.ROOT, env={**env, TIMINGS_ENV: str(timings)}, stdout=subprocess.PIPE,
                              stderr=f, text=True)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise RuntimeError(f"pipeline side failed (exit {proc.returncode}); see {log}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    events = [json.loads(line) for line in timings.read_text().splitlines()]
    ready = [e for e in events if e["event"] == "ready"]
    calls = sorted((e for e in events if e["event"] == "call"), key=lambda e: e["start"])
    if len(ready) != 1:
        raise RuntimeError(f"expected one GRM actor, saw {len(ready)} (an actor restart?); see {log}")
    r, end = ready[0], result["t_run_end"]
    steady = end - r["t"]
    gaps = sum(max(0.0, b["start"] - a["end"]) for a, b in zip(calls, calls[1:]))
    busy = sum(c["end"] - c["start"] for c in calls)
    result.update(
        actor=r, calls=len(calls), steady_seconds=round(steady, 3),
        breakdown_seconds={
            "actor_start (excluded)": round(r["t"] - result["t_run_start"], 2),
            "ready_to_first_call": round(calls[0]["start"] - r["t"], 3),
            "engine_busy_in_calls": round(busy, 3),
            "between_calls": round(gaps, 3),
            "after_last_call (vote, write, verify)": round(end - calls[-1]["end"], 3),
        },
        call_seconds=[round(c["end"] - c["start"], 3) for c in calls],
        tokens_in_calls=sum(c["tokens"] for c in calls),
        engine_cpu_seconds_in_calls=round(sum(c["cpu"] for c in calls), 3),
        engine_thread_cpu_seconds_in_calls=round(sum(c.get("thread_cpu", 0.0) for c in calls), 3),
    )
    return result


def _cpu_snapshot() -> dict[int, tuple[str, float]]:
    """CPU seconds so far of this process and all its descendants (Ray's processes and workers)."""
    import psutil

    me = psutil.Process()
    out = {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            out[proc.pid] = (proc.name(), t.user + t.system)
        except psutil.Error:
            pass
    return out


def _cpu_between(a: dict[int, tuple[str, float]], b: dict[int, tuple[str, float]], actor_pid: int) -> dict[str, float]:
    """CPU seconds used between two snapshots: by the GRM actor, and by everything else of the job, also
    per process name (the engine core, raylet, gcs_server, Ray workers...): where a pipeline's extra CPU goes."""
    used = {"grm_actor": 0.0, "engine_core": 0.0, "driver": 0.0, "other_ray_processes": 0.0}
    by_name: dict[str, float] = {}
    me = os.getpid()
    for pid, (name, t) in b.items():
        dt = t - a.get(pid, (name, 0.0))[1]
        key = ("grm_actor" if pid == actor_pid else "driver" if pid == me
               else "engine_core" if "EngineCor" in name else "other_ray_processes")
        used[key] += dt
        by_name[name] = by_name.get(name, 0.0) + dt
    top = dict(sorted(((n, round(v, 2)) for n, v in by_name.items() if v >= 0.05), key=lambda x: -x[1]))
    return {**{k: round(v, 2) for k, v in used.items()}, "by_process_name": top}


def pipeline_side(cfg_path: str) -> None:
    """Entry point of the pipeline subprocess: run() with the timed GRM stage; prints one JSON line."""
    import threading

    answer = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # Ray's and the actors' output goes to the log; stdout carries only the answer
    from grm_ray import pipeline
    from grm_ray.config import JobConfig
    from bench.timed import TIMINGS_ENV, TimedGRMSampler

    cfg = JobConfig(**json.loads(Path(cfg_path).read_text()))
    timings = Path(os.environ[TIMINGS_ENV])
    at_ready: dict[str, Any] = {}

    def watch() -> None:  # snapshot CPU times the moment the actor's engine is ready
        while "cpu" not in at_ready:
            if timings.exists() and '"ready"' in timings.read_text():
                at_ready["machine"] = common.machine_cpu()
                at_ready["cpu"] = _cpu_snapshot()
                return
            time.sleep(0.05)

    latest: dict[int, tuple[str, float]] = {}  # each process's last CPU reading: the engine core exits before
    done = threading.Event()                    # run() returns, and must still be counted

    def sample() -> None:
        while not done.wait(1.0):
            latest.update(_cpu_snapshot())

    t0 = time.time()
    (getattr(pipeline, "init_ray", None) or pipeline._init_ray)(cfg)  # the same local Ray run() starts
    t1 = time.time()
    pipeline.build = functools.partial(pipeline.build, grm_stage=TimedGRMSampler)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    threading.Thread(target=sample, daemon=True).start()
    summary = pipeline.run(cfg)
    t2 = time.time()
    done.set()
    at_end, machine_end = {**latest, **_cpu_snapshot()}, common.machine_cpu()
    at_ready.setdefault("cpu", {})
    ours = _cpu_between(at_ready["cpu"], at_end, 0)
    machine = common.cpu_delta(at_ready.get("machine", machine_end), machine_end)
    actor_pid = next(json.loads(l)["pid"] for l in timings.read_text().splitlines() if '"ready"' in l)
    print(json.dumps({"ray_init_seconds": round(t1 - t0, 2), "t_run_start": t1, "t_run_end": t2,
                      "steady_cpu_seconds": _cpu_between(at_ready["cpu"], at_end, actor_pid),
                      "steady_machine_busy_others": round(machine.get("busy", 0) - sum(
                          v for v in ours.values() if isinstance(v, float)), 2),
                      "steady_machine_steal": machine.get("steal"),
                      "summary": summary}, default=str), file=answer, flush=True)
    import ray

    ray.shutdown()
    answer.close()


def rate(passes: list[dict[str, Any]]) -> float:
    return sum(p["tokens"] for p in passes) / sum(p["seconds"] for p in passes)


def measure(args: argparse.Namespace, worker: common.Worker | None = None) -> dict[str, Any]:
    s = settings(args)
    cfg = make_config(args, s)
    env = common.engine_env(args.threads)
    gpu = common.has_gpu()
    own = worker is None
    w = worker or common.Worker("overhead-plain", cfg, env, args.workdir)
    print(f"[overhead] plain engine ready ({w.info['start_seconds']} s); plain passes ...", flush=True)
    before = {"one_call": w.call("stage", input=cfg.input),
              "batched": w.call("stage", input=cfg.input, batch_size=cfg.batch_size)}
    prompt_tokens = w.call("prompt_tokens", input=cfg.input)
    info = dict(w.info)
    keep = not gpu  # on a GPU the plain engine must free the device before the pipeline's actor starts
    if own and not keep:
        w.close()
    print("[overhead] pipeline run ...", flush=True)
    pipe = run_pipeline(cfg, env, args.workdir)
    after = {}
    if keep:
        print("[overhead] plain passes again ...", flush=True)
        after = {"one_call": w.call("stage", input=cfg.input),
                 "batched": w.call("stage", input=cfg.input, batch_size=cfg.batch_size)}
        if own:
            w.close()
    one = [before["one_call"]] + ([after["one_call"]] if after else [])
    batched = [before["batched"]] + ([after["batched"]] if after else [])
    plain_rate, batched_rate = rate(one), rate(batched)
    tokens = pipe["summary"]["generated_tokens"]
    pipe_rate = tokens / pipe["steady_seconds"]
    pipe_rate_with_start = tokens / (pipe["summary"]["wall_seconds"] + pipe["ray_init_seconds"])
    plain_rate_with_start = one[0]["tokens"] / (one[0]["seconds"] + info["start_seconds"])
    result = {
        "settings": {**s, "model": cfg.model, "structured": cfg.structured, "meta_mode": cfg.meta_mode,
                     "engine_kwargs": cfg.engine_kwargs, "threads": args.threads, "gpu": gpu,
                     "env": {k: env.get(k) for k in ("VLLM_ENABLE_V1_MULTIPROCESSING", "OMP_NUM_THREADS")}},
        "plain_engine": info, "plain_before": before, "plain_after": after, "pipeline": pipe,
        "prompt_tokens_per_ordering": prompt_tokens,
        "tokens_per_sample": tokens / max(1, pipe["summary"]["samples"]),
        "rates_tokens_per_s": {"plain_one_call": plain_rate, "plain_batched": batched_rate,
                               "pipeline_steady": pipe_rate, "pipeline_incl_start": pipe_rate_with_start,
                               "plain_incl_start": plain_rate_with_start},
        "ratio": pipe_rate / plain_rate,
        "ratio_vs_plain_batched": pipe_rate / batched_rate,
        "batching_ratio": batched_rate / plain_rate,
        "ratio_incl_start": pipe_rate_with_start / plain_rate_with_start,
        "plain_drift": (rate([after["one_call"]]) / rate([before["one_call"]])) if after else None,
    }
    # The engine's CPU per token on each side (plain: its worker and engine-core child; pipeline: the GRM actor
    # and its engine core, sampled every second as the core exits before run() returns): the same per token
    # means the pipeline's engine got less CPU (shared with Ray's processes), more means it ran slower.
    steady = pipe["steady_cpu_seconds"]
    result["engine_cpu_per_token"] = {
        "plain_one_call": sum(p["tree_cpu_seconds"] for p in one) / sum(p["tokens"] for p in one),
        "pipeline": (steady["grm_actor"] + steady["engine_core"]) / max(1, tokens)}
    print(f"[overhead] pipeline/plain tokens per second = {result['ratio']:.3f} "
          f"(vs plain in batches of {s['batch_size']}: {result['ratio_vs_plain_batched']:.3f}); engine CPU-s per "
          f"token plain {result['engine_cpu_per_token']['plain_one_call']:.4f}, pipeline "
          f"{result['engine_cpu_per_token']['pipeline']:.4f}", flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--batch-size", type=int, default=None, help="items per GRM call (default 8, full 64)")
    p.add_argument("--pipeline-side", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.pipeline_side:
        pipeline_side(args.pipeline_side)
        return
    result = measure(args)
    common.save_results("overhead", result)
    print(json.dumps({k: result.get(k) for k in ("ratio", "ratio_vs_plain_batched", "batching_ratio",
                                                 "ratio_incl_start", "plain_drift")}, indent=2))


if __name__ == "__main__":
    main()
