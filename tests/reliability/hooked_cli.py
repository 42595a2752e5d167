"""`grm-ray ...`, the real CLI, pipeline and engine, with test hooks on the GRM stage (rel_stages.hooked):

    python hooked_cli.py HOOKS_JSON score INPUT OUTPUT [options]

HOOKS_JSON holds the keyword arguments of rel_stages.hooked, e.g. '{"tag_dir": "/tmp/t", "tag": "grm",
"hold_after_call": 1}'. For the driver-crash test, which must kill the driver at an exact point.
"""
import functools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import rel_stages  # noqa: E402
from grm_ray import cli, pipeline  # noqa: E402

if __name__ == "__main__":
    rel_stages.by_value()
    hooks = json.loads(sys.argv.pop(1))
    pipeline.build = functools.partial(pipeline.build, grm_stage=rel_stages.hooked(pipeline.GRMSampler, **hooks))
    cli.main()
