"""The streaming-memory measurement's job: `pipeline.run` on a local Ray with a small object store, the GRM
stage replaced by rel_fakes.FakeSampler (one sample per row, no engine). It measures the streaming machinery
(read, normalise, actor pool, vote, commit), not scoring. Prints the run summary as JSON.

    python membound_job.py INPUT OUTPUT OBJECT_STORE_MB
"""
import functools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ray  # noqa: E402

import rel_fakes  # noqa: E402
from grm_ray import pipeline  # noqa: E402
from grm_ray.config import JobConfig  # noqa: E402

if __name__ == "__main__":
    inp, out, store_mb = sys.argv[1], sys.argv[2], int(sys.argv[3])
    ray.init(num_cpus=4, object_store_memory=store_mb << 20, include_dashboard=False, log_to_driver=False)
    rel_fakes.by_value()
    pipeline.build = functools.partial(pipeline.build, grm_stage=rel_fakes.fake_sampler(0.0))
    cfg = JobConfig(input=inp, output=out, model="fake", k=1, batch_size=8, rows_per_file=16)
    print("SUMMARY " + json.dumps(pipeline.run(cfg)), flush=True)
