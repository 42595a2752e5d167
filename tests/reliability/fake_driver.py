"""`grm-ray ...` with the GRM engine replaced by rel_fakes.FakeSampler: the real CLI, pipeline and storage.

    python fake_driver.py DELAY score INPUT OUTPUT [options]

For tests of the driver's crash/resume and storage paths, where a model would only add start-up time.
"""
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import rel_fakes  # noqa: E402
from grm_ray import cli, pipeline  # noqa: E402

if __name__ == "__main__":
    rel_fakes.by_value()
    delay = float(sys.argv.pop(1))
    pipeline.build = functools.partial(pipeline.build, grm_stage=rel_fakes.fake_sampler(delay))
    cli.main()
