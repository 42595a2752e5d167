"""Engine stand-ins for the tests that measure the job's machinery (storage, resume, streaming), not scoring.

`FakeSampler` is the real GRMSampler (orders, un-shuffling, row errors) driven by a deterministic fake engine
that answers `Scores: \\boxed{...}` without a model; `delay` seconds per engine call keeps a run going long
enough to interrupt it. Ray workers cannot import this test directory, so `by_value()` ships the module with
the pickled class.
"""
from __future__ import annotations

import os
import sys
import time
import zlib

from grm_ray.config import JobConfig
from grm_ray.engines import Generation
from grm_ray.stages import GRMSampler


class FakeEngine:
    max_prompt_tokens = 10**9

    def __init__(self, delay: float = 0.0):
        self.delay = delay

    def render(self, text: str) -> str:
        return text

    def count_tokens(self, texts):
        return [len(t) // 4 for t in texts]

    def sample(self, prompts, ns, n_responses, **_):  # seeds etc.: the fake is deterministic anyway
        time.sleep(self.delay)
        out = []
        for p, n, r in zip(prompts, ns, n_responses):
            h = zlib.crc32(p.encode())
            scores = ", ".join(str(1 + (h >> (3 * j)) % 10) for j in range(r))
            out.append([Generation(f"Specific Criteria: fake.\nScores: \\boxed{{{scores}}}", 8, "stop")] * n)
        return out

    def repair(self, prefixes, n_responses, **_):
        return [Generation("", 0, "length") for _ in prefixes]


class FakeSampler(GRMSampler):
    """GRMSampler on FakeEngine; `delay` seconds per engine call (see `fake_sampler`)."""

    delay = 0.0

    def __init__(self, cfg: JobConfig):
        super().__init__(cfg, engine=FakeEngine(self.delay))


def fake_sampler(delay: float = 0.0) -> type:
    """A FakeSampler class whose engine sleeps `delay` s per call (the class travels to Ray by value)."""
    return type("FakeSampler", (FakeSampler,), {"delay": delay})


def by_value() -> None:
    """Pickle this module's classes by value, so Ray workers need not import tests/reliability."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def pid_tagged(stage_cls: type, tag_dir: str, tag: str) -> type:
    """`stage_cls` unchanged (real engine), except that each instance leaves `tag_dir/<tag>-<pid>` behind,
    so a test can tell the GRM actor's process from the meta RM actor's (both are MapWorker(_StageActor))."""
    def __init__(self, cfg):
        stage_cls.__init__(self, cfg)
        with open(os.path.join(tag_dir, f"{tag}-{os.getpid()}"), "w"):
            pass

    return type(f"Tagged{stage_cls.__name__}", (stage_cls,), {"__init__": __init__})


class FakeServeSampler:
    """Stands in for serve.Sampler (same call: `.sample.remote((row, k))` -> row with samples) without an
    engine; a first response "RAISE" makes it fail, to exercise the server's error path."""

    def __init__(self, cfg_data: dict):
        self.cfg = JobConfig.model_validate(cfg_data)

    async def sample(self, item):
        row, k = item
        if row["responses"][0] == "RAISE":
            raise RuntimeError("fake engine failure")
        out = GRMSampler(self.cfg.model_copy(update={"k": k}), engine=FakeEngine())([row])[0]
        return {**row, **out}
