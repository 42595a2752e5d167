"""Sizing of the engine pools' batches in flight (no Ray, no engine)."""
import logging

from grm_ray.config import JobConfig
from grm_ray.pipeline import warn_if_underfed


def test_defaults_put_hundreds_of_sequences_in_flight():
    cfg = JobConfig()
    assert cfg.batch_size * cfg.k * cfg.max_batches_in_flight >= 1024  # vLLM's largest default max_num_seqs


def test_warns_when_batches_in_flight_cannot_fill_the_engine(caplog):
    caplog.set_level(logging.WARNING)
    assert warn_if_underfed(JobConfig(batch_size=4, k=8, max_batches_in_flight=2), 256, "GRMSampler")
    assert "at most 64 sequences in flight" in caplog.text and "max_num_seqs 256" in caplog.text
    assert not warn_if_underfed(JobConfig(batch_size=32, k=8, max_batches_in_flight=1), 256, "GRMSampler")
    assert not warn_if_underfed(JobConfig(), None, "GRMSampler")  # a server engine: nothing to compare with


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_stage_clock_counts_idle_gaps_and_batches_in_flight():
    from grm_ray.pipeline import StageClock

    t = Clock()
    c = StageClock(t)
    t.t = 100.0
    c.enter()                  # first batch at 100: time before it (engine start) is not idle
    t.t = 102.0
    c.enter()                  # two in flight from 102
    t.t = 104.0
    c.leave(8)
    t.t = 106.0
    f = c.leave(8)             # none in flight from 106
    assert f == {"batches": 2, "rows": 16, "span_seconds": 6.0, "idle_seconds": 0.0, "batch_seconds": 8.0,
                 "in_flight": 0}
    t.t = 110.0
    assert c.enter()["in_flight"] == 1  # starved 106 -> 110
    t.t = 112.0
    f = c.leave(4)
    assert f["idle_seconds"] == 4.0 and f["span_seconds"] == 12.0 and f["batch_seconds"] == 10.0


def test_stage_summary_adds_actors_and_names_a_starved_pool(caplog):
    from grm_ray.pipeline import stage_summary

    caplog.set_level(logging.WARNING)
    busy = {"batches": 4, "rows": 32, "span_seconds": 10.0, "idle_seconds": 0.5, "batch_seconds": 30.0}
    starved = {"batches": 1, "rows": 8, "span_seconds": 10.0, "idle_seconds": 6.0, "batch_seconds": 4.0}
    out = stage_summary({("GRMSampler", "a"): busy, ("GRMSampler", "b"): busy, ("MetaScorer", "c"): starved}, 4)
    assert out["GRMSampler"] == {"actors": 2, "batches": 8, "rows": 64, "span_seconds": 20.0, "idle_seconds": 1.0,
                                 "idle_share": 0.05, "mean_batches_in_flight": 3.0}
    assert out["MetaScorer"]["idle_share"] == 0.6 and out["MetaScorer"]["mean_batches_in_flight"] == 0.4
    assert "MetaScorer pool" in caplog.text and "60%" in caplog.text and "GRMSampler pool" not in caplog.text


def test_stage_stats_busy_counts_actors_with_a_batch_in_flight():
    from grm_ray.pipeline import StageStats

    s = StageStats()
    fig = {"batches": 1, "rows": 8, "span_seconds": 1.0, "idle_seconds": 0.0, "batch_seconds": 1.0}
    s.report("GRMSampler", "a", {**fig, "in_flight": 2})
    s.report("GRMSampler", "b", {**fig, "in_flight": 0})
    s.report("MetaScorer", "c", {**fig, "in_flight": 1})
    assert s.busy() == {"GRMSampler": (1, 2), "MetaScorer": (1, 1)}
    assert s.summary(4)["GRMSampler"]["actors"] == 2


def test_a_restarted_actor_is_one_actor_and_keeps_the_rows_of_its_first_life():
    """Ray restarts a killed actor under the same id, in another process: its batch in flight at death is
    not busy any more, and the rows of both lives count."""
    from grm_ray.pipeline import StageStats

    s = StageStats()
    fig = {"batches": 2, "rows": 8, "span_seconds": 3.0, "idle_seconds": 0.0, "batch_seconds": 3.0}
    s.report("GRMSampler", "a", {**fig, "in_flight": 1}, life="100")  # killed holding a batch
    s.report("GRMSampler", "a", {**fig, "in_flight": 0, "rows": 4}, life="200")
    assert s.busy() == {"GRMSampler": (0, 1)}
    out = s.summary(4)["GRMSampler"]
    assert out["actors"] == 1 and out["rows"] == 12 and out["batches"] == 4


def test_an_engine_takes_its_parents_cpu_priority():
    """Ray starts workers at niceness 15, below its raylet; an engine (and the engine-core child it spawns)
    takes its parent's back where the OS allows it (root or CAP_SYS_NICE), else keeps Ray's."""
    import os
    import subprocess
    import sys

    code = "import os; os.nice(15); from grm_ray.engines import take_parent_priority as t; print(t())"
    got = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    here = os.getpriority(os.PRIO_PROCESS, 0)
    lower = "import os; os.nice(1); os.setpriority(os.PRIO_PROCESS, 0, os.getpriority(os.PRIO_PROCESS, 0) - 1)"
    allowed = subprocess.run([sys.executable, "-c", lower], capture_output=True).returncode == 0  # the same right
    assert got == (here if allowed else min(19, here + 15))


def test_an_engine_actor_holds_at_most_max_batches_in_flight():
    """Ray Data runs up to 4 batches of each call at once, on top of the calls it sends an actor: the actor
    keeps the option's bound over all of them (a user sizing engine memory by it relies on that)."""
    import asyncio

    import pyarrow as pa

    from grm_ray.config import JobConfig
    from grm_ray.pipeline import _StageActor

    class Slow:  # a pure stand-in for an engine stage: counts the batches inside it
        needs, adds = ("x",), pa.schema([("y", pa.int64())])
        now = most = 0

        def __init__(self, cfg):
            pass

        async def acall(self, rows):
            Slow.now += 1
            Slow.most = max(Slow.most, Slow.now)
            await asyncio.sleep(0.02)
            Slow.now -= 1
            return [{"y": r["x"] * 2} for r in rows]

    actor = _StageActor(Slow, JobConfig(max_batches_in_flight=3))

    async def burst():
        return await asyncio.gather(*(actor(pa.table({"x": [i]})) for i in range(12)))

    out = asyncio.run(burst())
    assert [t.column("y")[0].as_py() for t in out] == [2 * i for i in range(12)]
    assert Slow.most == 3 and actor.clock.batches == 12


def test_a_dead_engine_core_is_quiet_only_while_no_request_is_in_flight():
    """The end of a run (Ray ends the engine core first) logs no EngineDeadError; a core lost under work does."""
    from grm_ray import engines

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("vllm.v1.engine.async_llm", logging.ERROR, __file__, 1, msg, None, None)

    engine = engines._Engine.__new__(engines._Engine)  # no vLLM here: only the in-flight count matters
    engines._ENGINES.add(engine)
    try:
        assert not engines._quiet_idle_end(record("AsyncLLM output_handler failed."))
        assert engines._quiet_idle_end(record("some other error"))
        engine._busy = 1
        assert engines._quiet_idle_end(record("AsyncLLM output_handler failed."))
    finally:
        engines._ENGINES.discard(engine)
