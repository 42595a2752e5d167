"""GRMSampler with timestamps, for the pipeline side of the overhead ratio (imported inside Ray actors).

It records when its engine is ready and the start, end and generated tokens of every call, as JSON lines
in the file named by $GRM_RAY_BENCH_TIMINGS. Clock: time.time(), comparable across processes of one machine.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

from grm_ray.stages import GRMSampler

TIMINGS_ENV = "GRM_RAY_BENCH_TIMINGS"


def warm_up(engine: Any) -> float:
    """One short structured sample of a 2-response prompt; returns its seconds.

    A fresh engine's first structured request pays a one-time cost: about 4 s here for the demo model (its
    first structured call took 5.8 s, the next ones 1.7 s; an unstructured first call costs only ~0.3 s
    extra), i.e. the structured-output backend's first use with Gemma's 262k vocab. It belongs to start-up,
    which both sides of the overhead ratio exclude, so both sides pay it before their clocks start.
    """
    from grm_ray import prompts

    t0 = time.perf_counter()
    text = engine.render(prompts.render_grm_prompt("Warm-up: say hello.", ["Hello!", "Hi."]))
    engine.sample([text], [1], [2])
    return time.perf_counter() - t0


def _record(event: dict[str, Any]) -> None:
    path = os.environ.get(TIMINGS_ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(event) + "\n")


class TimedGRMSampler(GRMSampler):
    def __init__(self, cfg: Any, engine: Any = None):
        t0 = time.time()
        super().__init__(cfg, engine)
        warm = warm_up(self.engine)
        import torch

        _record({"event": "ready", "t": time.time(), "init_seconds": time.time() - t0, "warmup_seconds": warm,
                 "pid": os.getpid(),
                 "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                 "vllm_multiprocessing": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1 (default)")})

    async def acall(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        t0, c0, th0 = time.time(), time.process_time(), time.thread_time()
        out = await super().acall(rows)
        _record({"event": "call", "start": t0, "end": time.time(), "cpu": time.process_time() - c0,
                 "thread_cpu": time.thread_time() - th0, "rows": len(rows),
                 "tokens": sum(s["n_tokens"] for r in out for s in r["samples"] or [])})
        return out
