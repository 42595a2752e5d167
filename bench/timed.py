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


def _record(event: dict[str, Any]) -> None:
    path = os.environ.get(TIMINGS_ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(event) + "\n")


class TimedGRMSampler(GRMSampler):
    def __init__(self, cfg: Any, engine: Any = None):
        t0 = time.time()
        super().__init__(cfg, engine)
        import torch

        _record({"event": "ready", "t": time.time(), "init_seconds": time.time() - t0, "pid": os.getpid(),
                 "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                 "vllm_multiprocessing": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1 (default)")})

    def __call__(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        t0, c0 = time.time(), time.process_time()
        out = super().__call__(rows)
        _record({"event": "call", "start": t0, "end": time.time(), "cpu": time.process_time() - c0, "rows": len(rows),
                 "tokens": sum(s["n_tokens"] for r in out for s in r["samples"] or [])})
        return out
