"""The streaming-memory measurement's job: `pipeline.run` on a local Ray with a small object store, on the
real GRM engine (the tiny model, one short structured sample per row). The GRM stage is
rel_stages.hooked(GRMSampler): it records its process and memory once its engine is built (TAG_DIR), so the
test can tell the engine's fixed cost from what the stream adds. Prints the run summary as JSON.

    python membound_job.py INPUT OUTPUT OBJECT_STORE_MB MODEL TAG_DIR
"""
import functools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ray  # noqa: E402

import rel_stages  # noqa: E402
from grm_ray import pipeline  # noqa: E402
from grm_ray.config import JobConfig  # noqa: E402

# As tests/conftest.py's TINY_ENGINE_KWARGS: a 64 MiB KV cache, eager mode.
ENGINE_KWARGS = {"kv_cache_memory_bytes": 64 << 20, "enforce_eager": True}

if __name__ == "__main__":
    inp, out, store_mb, model, tag_dir = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
    ray.init(num_cpus=4, object_store_memory=store_mb << 20, include_dashboard=False, log_to_driver=False)
    rel_stages.by_value()
    stage = rel_stages.hooked(pipeline.GRMSampler, tag_dir=tag_dir, tag="grm")
    pipeline.build = functools.partial(pipeline.build, grm_stage=stage)
    # k=1 and the smallest max_tokens: the engine does real work on every row, the stream stays the subject
    cfg = JobConfig(input=inp, output=out, model=model, k=1, max_tokens=8, max_model_len=1024, structured=True,
                    seed=1, batch_size=8, rows_per_file=16, engine_kwargs=ENGINE_KWARGS)
    print("SUMMARY " + json.dumps(pipeline.run(cfg)), flush=True)
