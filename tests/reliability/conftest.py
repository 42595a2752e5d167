"""Fixtures of the reliability suite.

`s3_endpoint`, `ray_local`, `hh_table`, `tiny_models` and `tiny_config` come from tests/conftest.py.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grm_ray.config import JobConfig
from grm_ray.console import log_path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # rel_util, rel_stages, faulty_s3

from grm_ray import storage  # noqa: E402
from rel_util import ADVERSARIAL, JOB, SECRETS, Job, bad_utf8_strings, cli_env, job_args, wait_for  # noqa: E402


@pytest.fixture
def rel_cfg(tiny_config, tmp_path):
    """JobConfig factory on the tiny models (tests/conftest.py's engine settings) with JOB's sizes."""
    def make(**over) -> JobConfig:
        return tiny_config(**{"input": str(tmp_path / "in"), "output": str(tmp_path / "out"), **JOB, **over})
    return make


@pytest.fixture(scope="session")
def cli_crash_run(s3_endpoint, tiny_models, hh_table, tmp_path_factory):
    """The real `grm-ray score` against S3 (moto) with distinctive credentials: run 1 is SIGKILLed after its
    first commits and its Ray cleaned up; run 2 (same command) finishes; run 3 fails (missing bucket).
    Yields what the crash and secrets tests check, with every log the runs wrote."""
    base = tmp_path_factory.mktemp("cli-crash")
    ray_tmp = Path(tempfile.mkdtemp(prefix="rr-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    logs: list[Path] = []
    try:
        fs, _ = storage.filesystem("s3://x/y", s3_endpoint)
        name = uuid.uuid4().hex[:8]
        fs.mkdir(f"crash-in-{name}")
        fs.mkdir(f"crash-out-{name}")
        with fs.open(f"crash-in-{name}/prefs/hh.parquet", "wb") as f:
            pq.write_table(hh_table.slice(0, 40), f, row_group_size=4)
        inp, out = f"s3://crash-in-{name}/prefs/", f"s3://crash-out-{name}/scored/"
        logs = [Path(log_path(out)), Path(log_path(f"s3://missing-{name}/scored/"))]  # the console's log files
        env = cli_env(AWS_ACCESS_KEY_ID="AKIARELIABILITYTEST", RAY_TMPDIR=str(ray_tmp), **SECRETS)
        args = job_args(inp, out, str(tiny_models["grm"]), s3_endpoint)

        first = Job(args, base, env, name="run1")
        try:
            wait_for(lambda: storage.committed_parts(fs, out[5:]) or first.proc.poll() is not None, 600,
                     "the first commit of run 1", interval=0.2)
            at_kill = storage.read_committed(fs, out[5:], ["source"]).num_rows
            first.kill_driver()
        finally:
            orphans = first.cleanup(grace=5)
        at_kill_final = storage.read_committed(fs, out[5:], ["source"]).num_rows  # workers may finish a part
        t0 = time.monotonic()
        rerun = Job(args, base, env, name="run2")
        rc = rerun.wait(900)
        seconds = time.monotonic() - t0
        missing = f"s3://missing-{name}/scored/"
        failing = Job(job_args(inp, missing, str(tiny_models["grm"]), s3_endpoint), base, env, name="run3-fails")
        failing_rc = failing.wait(300)
        yield {"output": out, "endpoint": s3_endpoint, "fs": fs, "committed_at_kill": at_kill,
               "committed_at_kill_final": at_kill_final, "orphans": len(orphans),
               "leftover_pids": first.session_pids(), "rerun": rerun, "rerun_rc": rc, "rerun_seconds": seconds,
               "failing": failing, "failing_rc": failing_rc, "ray_tmp": ray_tmp, "log_dir": base,
               "log_files": logs}
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
        for f in logs:
            f.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def matrix_run(ray_local, tiny_config, hh_table, tmp_path_factory):
    """ONE real run (tiny GRM, structured decoding, max_responses=64) over a directory of bad shards, an
    adversarial shard and good ones. Returns {"summary", "rows" (by source), "inputs" (rows per readable
    shard), "cfg"}. Shards and what each holds are listed in `shards` below."""
    from grm_ray.pipeline import run

    base = tmp_path_factory.mktemp("matrix")
    inp = base / "in"
    inp.mkdir()
    S, L = pa.string(), pa.list_(pa.string())
    shards = {
        "good.parquet": hh_table.slice(40, 4),                                      # HH transcripts
        "norows.parquet": pa.table({"prompt": pa.array([], S), "responses": pa.array([], L)}),
        "nocols.parquet": pa.table({"question": ["q1", "q2"], "answer": ["a1", "a2"]}),
        "prompt_only.parquet": pa.table({"prompt": ["p1"]}),
        "wrongtypes.parquet": pa.table({"prompt": ["p1", "p2"], "responses": [[1, 2], [3, 4]],
                                        "label": ["first", "second"]}),
        "resp_string.parquet": pa.table({"prompt": ["p1"], "responses": ["just a string"]}),
        "nulls.parquet": pa.table({
            "prompt": [None, "p", "p", "p", "   ", "p"],
            "responses": pa.array([["a", "b"], [], None, [None, "b"], ["a", "b"], ["", "b"]], L)}),
        "counts.parquet": pa.table({"prompt": ["one", "fifty", "seventy"],
                                    "responses": [["only one"], [f"r{i}" for i in range(50)],
                                                  [f"r{i}" for i in range(70)]],
                                    "label": [1, None, None]}),
        "dups.parquet": pa.table({"id": ["d1", "d1", "x", "u1"], "prompt": ["a", "b", "c", "d"],
                                  "responses": [["y", "n"]] * 4}),
        "dups2.parquet": pa.table({"id": ["x"], "prompt": ["e"], "responses": [["y", "n"]]}),
        "long.parquet": pa.table({"prompt": ["Too long: " + "word " * 3000], "responses": [["a", "b"]]}),
        "utf8.parquet": pa.table({
            "prompt": bad_utf8_strings([b"fine", b"bad \xff\xfe bytes",
                                        "ctl \x00\x07\x1b[31mred\x1b[0m \u202eevil \ud7ff".encode()]),
            "responses": [["a", "b"], ["a", "b"], ["\x00zero\x01", "tab\there\r\nline"]]}),
        "utf8_id.parquet": pa.table({"id": bad_utf8_strings([b"id-ok", b"id-\xff-bad"]), "prompt": ["p", "q"],
                                     "responses": [["a", "b"], ["a", "b"]]}),
        "huge.parquet": pa.table({"prompt": ["huge", "small"],
                                  "responses": [["x" * (4 << 20), "short"], ["a", "b"]]}),
        "dpo.parquet": pa.table({"prompt": ["Name a colour."], "chosen": ["Blue."], "rejected": ["Seven."]}),
        "extra_col.parquet": pa.table({"messages": [[{"role": "user", "content": "hi"}]],
                                       "responses": [["hello", "go away"]], "origin": ["crawl-7"]}),
        "adversarial.parquet": pa.Table.from_pylist(ADVERSARIAL),
    }
    for name, table in shards.items():
        pq.write_table(table, inp / name)
    (inp / "zero.parquet").write_bytes(b"")
    (inp / "notparquet.parquet").write_bytes(b"id,prompt\n1,hello\n")
    cfg = tiny_config(input=str(inp), output=str(base / "out"), **{**JOB, "max_responses": 64})
    summary = run(cfg)
    table = storage.read_table(cfg.output)
    return {"summary": summary, "rows": {r["source"]: r for r in table.to_pylist()}, "table": table,
            "inputs": {n: t.num_rows for n, t in shards.items()}, "cfg": cfg, "dir": inp}
