"""Planning, the part ledger, leases and input listing (plan.py, storage.py) on real files, without Ray."""
from __future__ import annotations

import collections
import json
import logging
import os
import signal
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grm_ray import plan, storage
from grm_ray.config import JobConfig


def write(path, n, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"prompt": [f"q{i}" for i in range(n)], "chosen": ["a"] * n, "rejected": ["b"] * n}),
                   path, **kw)


def cfg_for(inp, out="", **kw) -> JobConfig:
    return JobConfig(input=str(inp), output=str(out), **kw)


def commit(out, sources, prints=None, table=None):
    """A committed part holding `sources`, through the product's own writer."""
    fs, out_dir = storage.filesystem(str(out))
    fs.makedirs(out_dir, exist_ok=True)
    table = table or pa.table({"source": sources, "error": pa.nulls(len(sources), pa.string())})
    return storage.write_part(fs, out_dir, table, {}, plan.part_record(sources, prints or {}))


def test_ranges_and_gaps():
    assert plan.ranges_of([5, 0, 1, 2]) == [[0, 3], [5, 6]]
    assert plan.ranges_of([]) == []
    assert plan._gaps([[0, 3], [5, 6]], 8) == [(3, 5), (6, 8)]
    assert plan._gaps([], 4) == [(0, 4)]
    assert plan._gaps([[0, 4]], 4) == []


def test_hidden_paths_skipped_at_every_depth_but_explicit_files_read(tmp_path):
    inp = tmp_path / "in"
    for rel in ("a.parquet", "dt=1/b.parquet", "_temporary/0/c.parquet", "dt=1/_delta_log/d.parquet",
                "dt=1/.staging/e.parquet", "dt=2/_SUCCESS", "dt=2/.f.parquet", "x/y/z/g.parquet"):
        if rel.endswith(".parquet"):
            write(inp / rel, 1)
        else:
            (inp / rel).parent.mkdir(parents=True, exist_ok=True)
            (inp / rel).write_text("")
    _, root, infos = storage.list_inputs(str(inp))
    keys = [os.path.relpath(i["name"], root) for i in infos]
    assert keys == ["a.parquet", "dt=1/b.parquet", "x/y/z/g.parquet"]
    _, _, globbed = storage.list_inputs(str(inp / "*" / "*.parquet"))
    assert [os.path.relpath(i["name"], str(inp)) for i in globbed] == ["dt=1/b.parquet"]
    _, root, explicit = storage.list_inputs(str(inp / "_temporary" / "0" / "c.parquet"))
    assert [os.path.relpath(i["name"], root) for i in explicit] == ["c.parquet"]


def test_a_file_reached_by_several_glob_matches_is_listed_once(tmp_path):
    """`in/**` matches each directory and each file below it: every file is still one input file."""
    for rel in ("dt=1/a.parquet", "dt=2/x/b.parquet", "c.parquet"):
        write(tmp_path / "in" / rel, 1)
    for pattern in ("in/**", "in/dt=*/**", "in/*"):
        _, root, infos = storage.list_inputs(str(tmp_path / pattern))
        names = [os.path.relpath(i["name"], root) for i in infos]
        assert names == sorted(set(names)) and set(names) >= {"dt=1/a.parquet", "dt=2/x/b.parquet"}, pattern


def test_symlinked_files_and_directories_are_read_as_the_input_holds_them(tmp_path, caplog):
    """fsspec lists a symlink as type 'other' and does not descend: a directory input lost their rows.
    A dangling link holds no rows, and is named in a warning."""
    write(tmp_path / "in" / "a.parquet", 3)
    write(tmp_path / "store" / "b.parquet", 5)
    write(tmp_path / "store" / "sub" / "c.parquet", 2)
    os.symlink(tmp_path / "store" / "b.parquet", tmp_path / "in" / "b.parquet")
    os.symlink(tmp_path / "store" / "sub", tmp_path / "in" / "linked")
    os.symlink(tmp_path / "in", tmp_path / "in" / "loop")  # a cycle is read once
    os.symlink(tmp_path / "store" / "gone.parquet", tmp_path / "in" / "gone.parquet")
    for spelling in ("in", "in/**"):
        caplog.clear()
        with caplog.at_level("WARNING", logger="grm_ray.storage"):
            files = plan.scan_inputs(cfg_for(tmp_path / spelling, tmp_path / "out")).files
        assert [(f.key, f.rows) for f in files] == [("a.parquet", 3), ("b.parquet", 5), ("linked/c.parquet", 2)]
        assert "gone.parquet, which does not exist: skipped" in caplog.text


def test_an_output_inside_its_input_is_not_read_back_as_input(tmp_path):
    write(tmp_path / "in" / "a.parquet", 2)
    write(tmp_path / "in" / "scored" / "part-0.parquet", 2)  # what an earlier run committed there
    files = plan.scan_inputs(cfg_for(tmp_path / "in", tmp_path / "in" / "scored")).files
    assert [f.key for f in files] == ["a.parquet"]
    files = plan.scan_inputs(cfg_for(tmp_path / "in", tmp_path / "in" / "sc")).files  # a prefix, not the output
    assert [f.key for f in files] == ["a.parquet", "scored/part-0.parquet"]


def test_parquet_without_a_parquet_name_is_read_and_other_files_beside_it_skipped(tmp_path, caplog):
    """Hive names its files `000000_0`: read. A README beside the data: skipped, with a warning. A broken file
    that claims to be Parquet (by name or magic bytes): reported as unreadable."""
    inp = tmp_path / "in"
    write(inp / "000000_0", 2)
    write(inp / "a.parquet", 3)
    (inp / "README.txt").write_text("how this data was made")
    (inp / "broken.parquet").write_text("not parquet")
    (inp / "000001_0").write_bytes((inp / "000000_0").read_bytes()[:40])  # truncated: magic, no footer
    with caplog.at_level("WARNING", logger="grm_ray.plan"):
        found = plan.scan_inputs(cfg_for(inp))
    assert [(f.key, f.rows) for f in found.files] == [("000000_0", 2), ("a.parquet", 3)]
    assert sorted(found.bad_files) == ["000001_0", "broken.parquet"]
    assert "1 file(s) under the input are not Parquet and are skipped: README.txt" in caplog.text
    only_text = tmp_path / "csv"
    only_text.mkdir()
    (only_text / "a.csv").write_text("prompt,chosen,rejected\n")
    with pytest.raises(FileNotFoundError, match=r"no Parquet files under .*csv: 1 file\(s\) there, none of them "
                                                r"Parquet \(e.g. a.csv\)"):
        plan.scan_inputs(cfg_for(only_text))
    (inp / "README.txt").unlink()
    write(tmp_path / "notes.txt", 1)  # named explicitly, read whatever its name
    assert [f.rows for f in plan.scan_inputs(cfg_for(tmp_path / "notes.txt")).files] == [1]


def test_keys_are_relative_to_the_input_uri_not_to_the_files_present(tmp_path):
    """A glob over dt=* keeps every key when a sibling directory appears."""
    inp = tmp_path / "in"
    write(inp / "dt=1" / "a.parquet", 3)
    before = [f.key for f in plan.scan_inputs(cfg_for(inp / "dt=*")).files]
    write(inp / "dt=2" / "b.parquet", 2)
    after = [f.key for f in plan.scan_inputs(cfg_for(inp / "dt=*")).files]
    assert before == ["dt=1/a.parquet"] and after == ["dt=1/a.parquet", "dt=2/b.parquet"]
    assert [f.key for f in plan.scan_inputs(cfg_for(inp / "dt=1")).files] == ["a.parquet"]
    assert [f.key for f in plan.scan_inputs(cfg_for(inp)).files] == after


def test_units_are_bounded_in_rows_and_skip_committed_ranges(tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    write(inp / "big.parquet", 40, row_group_size=40)  # one row group, cut into units of 7 rows
    write(inp / "small.parquet", 3)
    cfg = cfg_for(inp, out, unit_rows=7)
    inputs = plan.scan_inputs(cfg)
    p = plan.make_plan(cfg, inputs, plan.Ledger())
    spans = [(u["key"], u["start"], u["stop"]) for u in p.units]
    assert spans == [("big.parquet", a, min(40, a + 7)) for a in range(0, 40, 7)] + [("small.parquet", 0, 3)]
    prints = {f.key: f.fingerprint for f in inputs.files}
    commit(out, [f"big.parquet#{r}" for r in range(10, 20)] + ["small.parquet#1"], prints)
    p = plan.make_plan(cfg, inputs, plan.read_ledger(*storage.filesystem(str(out))))
    spans = [(u["key"], u["start"], u["stop"]) for u in p.units]
    assert spans == [("big.parquet", 0, 7), ("big.parquet", 7, 10), ("big.parquet", 20, 27),
                     ("big.parquet", 27, 34), ("big.parquet", 34, 40), ("small.parquet", 0, 1),
                     ("small.parquet", 2, 3)]
    assert p.skipped_rows == 11 and p.total_rows == 43


def test_units_grow_past_max_units_and_still_cover_every_row_once(tmp_path):
    """A run plans at most max_units units (each a Ray Data block with driver state of its own): past
    max_units x unit_rows rows the units grow, files and row groups still bounding them."""
    for i, rows in enumerate([50, 7, 23]):
        write(tmp_path / "in" / f"f{i}.parquet", rows, row_group_size=30)
    cfg = cfg_for(tmp_path / "in", unit_rows=4, max_units=10)
    p = plan.make_plan(cfg, plan.scan_inputs(cfg), plan.Ledger(ranges={"f0.parquet": [[0, 10]]}))
    size = -(-(40 + 7 + 23) // 10)  # 70 rows to score over 10 units: 7 rows each, not 4
    assert all(u["stop"] - u["start"] <= size for u in p.units) and len(p.units) <= 10 + 4  # + file/group ends
    rows = collections.Counter((u["key"], r) for u in p.units for r in range(u["start"], u["stop"]))
    assert set(rows.values()) == {1} and len(rows) == 70 and ("f0.parquet", 9) not in rows
    small = plan.make_plan(cfg.model_copy(update={"max_units": 1000}), plan.scan_inputs(cfg), plan.Ledger())
    assert max(u["stop"] - u["start"] for u in small.units) == 4  # under the cap, unit_rows rules


def test_units_never_span_two_row_groups(tmp_path):
    """Small row groups stay one unit each (a block of their own downstream); big ones are split."""
    write(tmp_path / "in" / "g.parquet", 10, row_group_size=4)  # groups [0,4) [4,8) [8,10)
    cfg = cfg_for(tmp_path / "in", unit_rows=3)
    p = plan.make_plan(cfg, plan.scan_inputs(cfg), plan.Ledger(ranges={"g.parquet": [[2, 5]]}))
    assert [(u["start"], u["stop"]) for u in p.units] == [(0, 2), (5, 8), (8, 10)]


def test_units_read_back_every_uncommitted_row_once_from_many_row_groups(tmp_path):
    """A unit names its one row group (not the file's whole group list, which would copy a 1,000-group
    file's list into each of its units on the driver); read_units reads exactly its rows from it."""
    from grm_ray import pipeline

    sizes = [3, 1, 250, 2] + [5] * 40  # small groups, one big group split into units, many groups
    tables = [pa.table({"prompt": [f"q{sum(sizes[:g]) + i}" for i in range(n)], "chosen": ["a"] * n,
                        "rejected": ["b"] * n}) for g, n in enumerate(sizes)]
    (tmp_path / "in").mkdir()
    with pq.ParquetWriter(tmp_path / "in" / "g.parquet", tables[0].schema) as w:
        for t in tables:
            w.write_table(t)
    cfg = cfg_for(tmp_path / "in", unit_rows=64, batch_size=4)
    inputs = plan.scan_inputs(cfg)
    assert inputs.files[0].groups == tuple(sizes)
    done = [[2, 5], [100, 130], [300, 301]]
    p = plan.make_plan(cfg, inputs, plan.Ledger(ranges={"g.parquet": done}))
    assert all(set(u) >= {"group"} and "groups" not in u for u in p.units)
    seen = []
    for u in p.units:
        for t in pipeline.read_units(pa.Table.from_pylist([u]), cfg, inputs.passthrough, frozenset()):
            seen += [(s, q) for s, q in zip(t.column("source").to_pylist(), t.column("prompt").to_pylist())]
    want = [r for r in range(sum(sizes)) if not any(a <= r < b for a, b in done)]
    assert seen == [(f"g.parquet#{r}", f"q{r}") for r in want]


def test_ledger_counts_detect_missing_duplicated_and_orphaned_rows(tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    write(inp / "a.parquet", 4)
    cfg = cfg_for(inp, out)
    inputs = plan.scan_inputs(cfg)
    fs, out_dir = storage.filesystem(str(out))
    commit(out, ["a.parquet#0", "a.parquet#1"])
    with pytest.raises(plan.JobError, match=r"2 input row\(s\) missing \(a.parquet: 2\); rerun the same command"):
        plan.check_counts(inputs, plan.read_ledger(fs, out_dir))
    commit(out, ["a.parquet#1", "a.parquet#2", "a.parquet#3", "gone.parquet#0", "a.parquet#9"])
    led = plan.read_ledger(fs, out_dir)
    assert led.duplicated == {"a.parquet": 1} and led.rows == 7 and led.parts == 2
    first, second = sorted(storage.committed_parts(fs, out_dir))
    assert led.overlaps in ([(first, second)], [(second, first)])
    with pytest.raises(plan.JobError, match=r"1 row\(s\) committed twice \(a.parquet: 1\); parts holding the same "
                                            r"rows: part-\w+.parquet and part-\w+.parquet.*Delete one of each pair"):
        plan.check_counts(inputs, led)
    assert plan.orphans(inputs, led) == {"a.parquet": 1, "gone.parquet": 1}


def test_a_part_whose_record_disagrees_with_its_rows_is_refused(tmp_path):
    out = tmp_path / "out"
    fs, out_dir = storage.filesystem(str(out))
    table = pa.table({"source": ["a.parquet#0", "a.parquet#1"]})
    fs.makedirs(out_dir, exist_ok=True)
    storage.write_part(fs, out_dir, table, {}, plan.part_record(["a.parquet#0"], {}))
    with pytest.raises(plan.JobError, match="holds 2 rows but records 1"):
        plan.read_ledger(fs, out_dir)


def test_a_damaged_or_foreign_part_is_an_error_naming_it(tmp_path):
    """A part cut short (zero bytes after a power loss) or one without our record: one line naming the file."""
    out = tmp_path / "out"
    fs, out_dir = storage.filesystem(str(out))
    fs.makedirs(out_dir, exist_ok=True)
    (out / "part-cut.parquet").write_bytes(b"")
    with pytest.raises(plan.JobError, match=r"part-cut.parquet cannot be read .* move it out of the output"):
        plan.read_ledger(fs, out_dir)
    os.remove(out / "part-cut.parquet")
    pq.write_table(pa.table({"x": [1]}), out / "part-00000-spark.snappy.parquet")
    with pytest.raises(plan.JobError, match=r"part-00000-spark.snappy.parquet has no row record .* not written by"):
        plan.read_ledger(fs, out_dir)


def test_changed_input_is_an_error_naming_it_unless_rescored(tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    write(inp / "a.parquet", 2)
    write(inp / "b.parquet", 2)
    cfg = cfg_for(inp, out)
    inputs = plan.scan_inputs(cfg)
    prints = {f.key: f.fingerprint for f in inputs.files}
    commit(out, ["a.parquet#0", "a.parquet#1", "b.parquet#0"], prints)
    time.sleep(0.01)
    write(inp / "a.parquet", 3)  # rewritten: new size and mtime
    fs, out_dir = storage.filesystem(str(out))
    inputs = plan.scan_inputs(cfg)
    led = plan.read_ledger(fs, out_dir)
    with pytest.raises(plan.JobError, match=r"changed since their rows were scored: a.parquet .*--rescore-changed"):
        plan.make_plan(cfg, inputs, led)
    p = plan.make_plan(cfg.model_copy(update={"rescore_changed": True}), inputs, led)
    assert p.rescore == ["a.parquet"]
    assert plan.rewrite_parts(fs, led.parts_of["a.parquet"], plan.rows_of_files({"a.parquet"})) == 2
    led = plan.read_ledger(fs, out_dir)
    assert led.ranges == {"b.parquet": [[0, 1]]} and led.rows == 1


def test_input_columns_named_like_output_columns_are_kept_under_a_prefix():
    assert plan.input_renames(["prompt", "chosen", "rejected", "source", "label", "rewards", "id"], "dpo") == {
        "label": "input_label", "rewards": "input_rewards", "source": "input_source"}
    assert plan.input_renames(["messages", "responses", "label", "error"], "responses") == {"error": "input_error"}
    assert plan.input_renames(["chosen", "rejected", "samples", "input_samples"], "hh") == {
        "samples": "input_input_samples"}


def lease_file(out):
    return out / plan.LEASE_FILE


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    fs, out_dir = storage.filesystem(str(out))
    first = plan.Lease(fs, out_dir, expiry=60)
    first.acquire()
    try:
        second = plan.Lease(fs, out_dir, expiry=60)
        with pytest.raises(plan.JobError, match=rf"being written by another job: .* pid {os.getpid()} "
                                                rf"\(lease {first.owner['id']}"):
            second.acquire()
        assert json.loads(lease_file(out).read_text())["id"] == first.owner["id"]
    finally:
        first.release()
    assert not lease_file(out).exists()
    second.acquire()  # free again
    second.release()


def test_a_stale_or_dead_lease_is_taken_over_with_a_log_line(tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    fs, out_dir = storage.filesystem(str(out))
    stale = {"host": "elsewhere", "pid": 1, "id": "old", "started": 0, "heartbeat": time.time() - 100, "expiry": 30}
    lease_file(out).write_text(json.dumps(stale))
    lease = plan.Lease(fs, out_dir, expiry=30)
    with caplog.at_level(logging.WARNING, logger="grm_ray.plan"):
        lease.acquire()
    assert "taking over the output lease of elsewhere pid 1" in caplog.text and "no heartbeat for 10" in caplog.text
    lease.release()
    # a driver of this host that was killed: its pid no longer runs, taken over at once
    dead = {**stale, "host": lease.owner["host"], "pid": 2 ** 22 + 17, "heartbeat": time.time()}
    lease_file(out).write_text(json.dumps(dead))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="grm_ray.plan"):
        lease = plan.Lease(fs, out_dir, expiry=30)
        lease.acquire()
    assert "its process no longer runs on this host" in caplog.text
    lease.release()
    # a live holder elsewhere: refused, saying when its lease could be taken over at the earliest
    lease_file(out).write_text(json.dumps({**stale, "heartbeat": time.time() - 10}))
    with pytest.raises(plan.JobError, match=r"being written by another job: elsewhere pid 1 .*last heartbeat 10s ago"
                                            r".*30s without a heartbeat: 20s from now at the earliest"):
        plan.Lease(fs, out_dir, expiry=30).acquire()


def test_an_unreadable_lease_is_taken_over_and_another_users_process_is_alive(tmp_path, caplog, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    fs, out_dir = storage.filesystem(str(out))
    lease_file(out).write_text("")
    with caplog.at_level(logging.WARNING, logger="grm_ray.plan"):
        lease = plan.Lease(fs, out_dir, expiry=30)
        lease.acquire()
    assert "taking over the output lease of an unreadable lease file" in caplog.text
    lease.release()
    # without psutil, os.kill(pid, 0) -> EPERM means the process runs as another user: alive, not taken over

    def eperm(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setitem(__import__("sys").modules, "psutil", None)
    monkeypatch.setattr(os, "kill", eperm)
    assert plan._alive(4242, None)


def test_the_heartbeat_renews_and_notices_a_takeover(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    fs, out_dir = storage.filesystem(str(out))
    lease = plan.Lease(fs, out_dir, expiry=6)  # beats every second
    lease.acquire()
    first = json.loads(lease_file(out).read_text())["heartbeat"]
    time.sleep(2.5)
    assert json.loads(lease_file(out).read_text())["heartbeat"] > first and lease.lost is None
    lease_file(out).write_text(json.dumps({"host": "other", "pid": 3, "id": "thief", "started": 0,
                                           "heartbeat": time.time(), "expiry": 6}))
    time.sleep(2.5)
    assert lease.lost and "taken over by other pid 3" in lease.lost
    lease.release()
    assert json.loads(lease_file(out).read_text())["id"] == "thief"  # not ours: left alone


def test_s3_lease_uses_conditional_writes(s3_endpoint):
    fs, _ = storage.filesystem("s3://lease-bucket/x", s3_endpoint)
    fs.mkdir("lease-bucket")
    first = plan.Lease(fs, "lease-bucket/out", expiry=60)
    first.acquire()
    second = plan.Lease(fs, "lease-bucket/out", expiry=60)
    with pytest.raises(plan.JobError, match="being written by another job"):
        second.acquire()
    # a racing writer that read no lease and tries to create it fails on If-None-Match
    with pytest.raises(plan.JobError, match="took the output lease first"):
        second._write(None, create=True)
    # a renewal with a stale ETag fails on If-Match
    with pytest.raises(plan.JobError, match="took the output lease first"):
        second._write('"0123"', create=False)
    first.release()
    assert not fs.exists("lease-bucket/out/_lease.json")
    # a lease object that is not one (empty, cut short, `null`) is taken over, not a dead end
    for junk in (b"", b"null", b'{"heartbeat": "x"}'):
        fs.pipe_file("lease-bucket/out/_lease.json", junk)
        lease = plan.Lease(fs, "lease-bucket/out", expiry=60)
        lease.acquire()
        assert json.loads(fs.cat_file("lease-bucket/out/_lease.json"))["id"] == lease.owner["id"]
        lease.release()


def test_s3_listing_keys_and_fingerprints(s3_endpoint):
    fs, _ = storage.filesystem("s3://plan-in/x", s3_endpoint)
    fs.mkdir("plan-in")
    for key in ("prefs/dt=1/a.parquet", "prefs/_temporary/b.parquet", "prefs/dt=1/.c.parquet"):
        with fs.open(f"plan-in/{key}", "wb") as f:
            pq.write_table(pa.table({"prompt": ["q"], "chosen": ["a"], "rejected": ["b"]}), f)
    fs.pipe("plan-in/prefs/dt=2/", b"")  # an empty "folder" object, as S3 consoles and some tools make
    fs.pipe("plan-in/prefs/dt=3", b"")
    cfg = cfg_for("s3://plan-in/prefs/", s3_endpoint_url=s3_endpoint)
    files = plan.scan_inputs(cfg).files
    assert [f.key for f in files] == ["dt=1/a.parquet"]
    assert [f.key for f in plan.scan_inputs(cfg_for("s3://plan-in/prefs/**", s3_endpoint_url=s3_endpoint)).files
            ] == ["dt=1/a.parquet"]
    before = files[0].fingerprint
    with fs.open("plan-in/prefs/dt=1/a.parquet", "wb") as f:
        pq.write_table(pa.table({"prompt": ["other"], "chosen": ["a"], "rejected": ["b"]}), f)
    after = plan.scan_inputs(cfg).files[0].fingerprint
    assert before != after and before.split(":")[0].isdigit()


def test_the_same_input_spelled_another_way_resumes_and_another_input_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "in1" / "a.parquet", 2)
    write(tmp_path / "g" / "dt=1" / "a.parquet", 2)
    out = tmp_path / "out"
    fs, out_dir = storage.filesystem(str(out))
    fs.makedirs(out_dir, exist_ok=True)
    for before, now in [("in1", "in1/"), ("in1", "./in1"), ("in1", str(tmp_path / "in1")),
                        ("g/dt=*", "g/dt=*/*.parquet"), ("g/dt=*", "g")]:
        storage.write_json(fs, f"{out_dir}/{storage.JOB_FILE}", {"config": cfg_for(before, out).public()})
        plan.check_previous_job(cfg_for(now, out), fs, out_dir)  # one key space: resumes
    plan.check_previous_job(cfg_for("in1", out, k=4), fs, out_dir)  # nothing committed: another job may start
    commit(out, ["dt=1/a.parquet#0"])
    with pytest.raises(plan.JobError, match=r"input: 'g/dt=\*' before, 'in1' now.*--overwrite"):
        plan.check_previous_job(cfg_for("in1", out), fs, out_dir)
    with pytest.raises(plan.JobError, match=r"k: 8 before, 4 now"):
        plan.check_previous_job(cfg_for("g", out, k=4), fs, out_dir)
    # one file of a directory is keyed like the directory's files (relative to it): the same key space
    storage.write_json(fs, f"{out_dir}/{storage.JOB_FILE}", {"config": cfg_for("g/dt=1", out).public()})
    plan.check_previous_job(cfg_for("g/dt=1/a.parquet", out), fs, out_dir)


def test_a_clashing_column_keeps_one_output_name_across_files(tmp_path):
    base = {"prompt": ["q"], "chosen": ["a"], "rejected": ["b"]}
    pq.write_table(pa.table({**base, "source": ["S-a"], "input_source": ["IS-a"]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({**base, "source": ["S-b"]}), tmp_path / "b.parquet")
    inputs = plan.scan_inputs(cfg_for(tmp_path))
    # file b has no input_source, but a does: b's `source` must not land in the column holding a's input_source
    assert [f.renames for f in inputs.files] == [{"source": "input_input_source"}] * 2
    assert {"input_source", "input_input_source"} <= set(inputs.passthrough.names)


def test_a_missing_input_stops_the_job_before_its_output_is_made(tmp_path):
    from grm_ray import pipeline

    for missing in ("no-such-dir", "no-such-dir/dt=*/*.parquet"):
        with pytest.raises(FileNotFoundError, match=f"input .*{missing.split('/')[0]}.* does not exist"):
            pipeline.run(cfg_for(tmp_path / missing, tmp_path / "out"))
        assert not (tmp_path / "out").exists()
    assert storage.input_exists(str(tmp_path)) and storage.input_exists(str(tmp_path) + "/*.parquet")
    (tmp_path / "in").mkdir()
    for option, bad in (("--model", dict(model="/no/such/grm")),
                        ("--meta-model", dict(meta_mode="classifier", meta_model="./no-such-meta"))):
        with pytest.raises(FileNotFoundError, match=f"{option} .*no-such|{option} /no/such/grm: no such path"):
            pipeline.run(cfg_for(tmp_path / "in", tmp_path / "out", **bad))
        assert not (tmp_path / "out").exists()
    with pytest.raises(plan.JobError, match="--api-key-env names GRM_RAY_NO_SUCH_KEY, but .* not set"):
        pipeline.run(cfg_for(tmp_path / "in", tmp_path / "out", engine="openai", base_url="http://127.0.0.1:9/v1",
                             api_key_env="GRM_RAY_NO_SUCH_KEY"))
    assert not (tmp_path / "out").exists()
    (tmp_path / "not-an-output").mkdir()
    for prev, why in (("gone", "no such path"), ("not-an-output", "no _job.json there")):  # --reuse likewise
        with pytest.raises(plan.JobError, match=f"--reuse .*{prev}: {why}, so it is not a grm-ray output"):
            pipeline.run(cfg_for(tmp_path / "in", tmp_path / "out").model_copy(update={"reuse": str(tmp_path / prev)}))
        assert not (tmp_path / "out").exists()


def test_verify_refuses_a_path_that_is_not_an_output(tmp_path):
    """A typo in `grm-ray verify`'s path must not pass the audit as an empty output."""
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plan.audit(cfg_for("", tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(plan.JobError, match="not a grm-ray output"):
        plan.audit(cfg_for("", tmp_path / "empty"))


def test_a_store_that_cannot_be_reached_is_one_error_line_naming_the_input(tmp_path, monkeypatch):
    """botocore's errors are not OSErrors: they used to end `grm-ray score` in a page of traceback."""
    from typer.testing import CliRunner

    from grm_ray.cli import app

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    r = CliRunner().invoke(app, ["score", "s3://prefs/in/", str(tmp_path / "out"),
                                 "--s3-endpoint-url", "http://127.0.0.1:9"])
    assert r.exit_code == 2, r.output
    assert "error: cannot reach input s3://prefs/in/: NoCredentialsError" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "out").exists()


def test_ctrl_c_or_sigterm_says_what_is_kept_and_how_to_resume(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from grm_ray import pipeline
    from grm_ray.cli import app

    def interrupted(cfg, progress=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run", interrupted)
    write(tmp_path / "in" / "a.parquet", 1)
    r = CliRunner().invoke(app, ["score", str(tmp_path / "in"), str(tmp_path / "out")])
    assert r.exit_code == 130, r.output
    assert "error: interrupted: committed parts are kept; rerun the same command to resume" in r.output

    def terminated(cfg, progress=None):  # what Kubernetes or activeDeadlineSeconds sends
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

    monkeypatch.setattr(pipeline, "run", terminated)
    before = signal.getsignal(signal.SIGTERM)
    try:
        r = CliRunner().invoke(app, ["score", str(tmp_path / "in"), str(tmp_path / "out")])
    finally:
        signal.signal(signal.SIGTERM, before)
    assert r.exit_code == 143, r.output
    assert "error: terminated (SIGTERM): committed parts are kept; rerun the same command to resume" in r.output


def test_parts_with_other_columns_than_the_committed_ones_are_warned_of(tmp_path, caplog):
    """The input gained a column since the first run: pq.read_table("dir/") would drop it without a word."""
    from grm_ray.pipeline import warn_column_drift
    from grm_ray.schema import OUTPUT_FIELDS

    write(tmp_path / "in" / "a.parquet", 2)
    out = tmp_path / "out"
    commit(out, ["a.parquet#0", "a.parquet#1"],
           table=pa.table({"prompt": ["q", "q"], "source": ["a.parquet#0", "a.parquet#1"]}))
    fs, out_dir = storage.filesystem(str(out))
    led = plan.read_ledger(fs, out_dir)
    assert led.columns == {("prompt", "source")}
    same = pa.schema([("prompt", pa.string())])
    led.columns = {tuple(["prompt", *(f.name for f in OUTPUT_FIELDS)])}
    assert not warn_column_drift(led.columns, same, writing=True)
    with caplog.at_level(logging.WARNING):
        assert warn_column_drift(led.columns, pa.schema([("prompt", pa.string()), ("topic", pa.string())]), True)
    assert "new: topic" in caplog.text
    assert not warn_column_drift(led.columns, pa.schema([("topic", pa.string())]), writing=False)  # nothing to write


def test_consecutive_units_of_one_row_group_are_read_in_one_pass(tmp_path):
    """Parquet cannot start a read inside a row group: each unit of a big group read alone decoded the group
    up to its start (and fetched all of it), so the units of one group are read as one range."""
    write(tmp_path / "in" / "a.parquet", 10, row_group_size=10)
    write(tmp_path / "in" / "b.parquet", 6, row_group_size=3)
    out = tmp_path / "out"
    commit(out, ["a.parquet#4"])  # a gap splits a's group into two runs
    cfg = cfg_for(tmp_path / "in", out, unit_rows=2)
    fs, out_dir = storage.filesystem(str(out))
    p = plan.make_plan(cfg, plan.scan_inputs(cfg), plan.read_ledger(fs, out_dir))
    assert p.unit_rows == 2 and len(p.units) == 9
    runs = [(u["key"], u["group"][0], u["start"], u["stop"]) for u in plan.read_runs(p.units)]
    assert runs == [("a.parquet", 0, 0, 4), ("a.parquet", 0, 5, 10), ("b.parquet", 0, 0, 3), ("b.parquet", 1, 3, 6)]


def test_auto_detection_says_which_format_it_chose_when_two_fit(tmp_path, caplog):
    inp = tmp_path / "in"
    inp.mkdir()
    pq.write_table(pa.table({"prompt": ["q"], "chosen": ["a"], "rejected": ["b"], "responses": [["x", "y"]]}),
                   inp / "both.parquet")
    with caplog.at_level(logging.WARNING, logger="grm_ray.plan"):
        files = plan.scan_inputs(cfg_for(inp, tmp_path / "out")).files
    assert files[0].fmt == "responses" and "pass --input-format dpo" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="grm_ray.plan"):
        files = plan.scan_inputs(cfg_for(inp, tmp_path / "out", input_format="dpo")).files
    assert files[0].fmt == "dpo" and "input-format" not in caplog.text
