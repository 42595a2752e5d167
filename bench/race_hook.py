"""Ray worker setup hook of bench/race.py: stamps when each engine-stage call starts and ends, on both sides
(grm-ray's _StageActor and ray.data.llm's vLLM stage), so the race times the engines' working span only."""
from __future__ import annotations

import json
import os
import time

STAMPS_ENV = "GRM_RAY_RACE_STAMPS"


def _stamp(kind: str) -> None:
    with open(os.environ[STAMPS_ENV], "a") as f:
        f.write(json.dumps({"pid": os.getpid(), "kind": kind, "t": time.time()}) + "\n")


def setup() -> None:
    if not os.environ.get(STAMPS_ENV):
        return
    from grm_ray import pipeline

    grm_call = pipeline._StageActor.__call__

    async def call(self, table):
        _stamp("start")
        out = await grm_call(self, table)
        _stamp("end")
        return out

    pipeline._StageActor.__call__ = call
    try:
        from ray.llm._internal.batch.stages.vllm_engine_stage import vLLMEngineStageUDF
    except ImportError:
        return
    rdl_udf = vLLMEngineStageUDF.udf

    async def udf(self, batch):
        _stamp("start")
        async for row in rdl_udf(self, batch):
            yield row
        _stamp("end")

    vLLMEngineStageUDF.udf = udf


def span(path: str, t0: float, t1: float) -> float:
    """Seconds from the first call start to the last call end stamped between t0 and t1."""
    with open(path) as f:
        stamps = [json.loads(line) for line in f if line.strip()]
    ts = [s for s in stamps if t0 <= s["t"] <= t1]
    return max(s["t"] for s in ts if s["kind"] == "end") - min(s["t"] for s in ts if s["kind"] == "start")
