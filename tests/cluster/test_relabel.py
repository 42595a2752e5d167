"""jobs/relabel.py: one date partition scored once, a report beside it, a second run a no-op."""
from __future__ import annotations

import datetime as dt
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster_util import REPO, load_relabel

relabel = load_relabel()
SMOKE = str(REPO / "jobs" / "configs" / "cpu-smoke.yaml")
DATE = "2025-03-14"


def args_for(tmp_path, models=None, *extra: str) -> list[str]:
    argv = ["--date", DATE, "--input", str(tmp_path / "prefs" / "dt={date}"),
            "--output", str(tmp_path / "scored" / "dt={date}"), "--config", SMOKE,
            "--set", "meta_mode=none", "--set", "k=2", "--set", "max_tokens=48", "--set", "max_model_len=1024",
            "--set", "rows_per_file=4"]
    if models:
        argv += ["--set", f"model={models['grm']}"]
    return argv + list(extra)


def test_resolve_date():
    today = dt.date(2025, 3, 1)
    assert relabel.resolve_date("yesterday", today) == "2025-02-28"
    assert relabel.resolve_date("today", today) == "2025-03-01"
    assert relabel.resolve_date("2024-02-29") == "2024-02-29"
    for bad in ("2025-02-30", "14/03/2025", "last week"):
        with pytest.raises(relabel.ConfigError, match="--date"):
            relabel.resolve_date(bad)


def test_bad_options_exit_2(tmp_path, capsys):
    argv = args_for(tmp_path)
    bad_output = argv.copy()
    bad_output[bad_output.index("--output") + 1] = str(tmp_path / "scored")  # no {date}: all days in one dir
    assert relabel.main(bad_output) == 2
    assert "--output must contain {date}" in capsys.readouterr().err
    assert relabel.main(argv + ["--set", "k_metta=1"]) == 2
    assert "k_metta" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_force_reruns_a_complete_date_and_reports_failure(tmp_path, capsys):
    """A complete date whose input is gone is skipped; with --force it runs again (and fails: no input)."""
    out = tmp_path / "scored" / f"dt={DATE}"
    out.mkdir(parents=True)
    (out / "_job.json").write_text(json.dumps({"status": "complete", "config": {}, "summary": {
        "rows": 5, "new_rows": 5, "error_rows": 1, "samples": 10, "generated_tokens": 300, "wall_seconds": 9.5}}))
    assert relabel.main(args_for(tmp_path)) == 0
    rebuilt = json.loads((out / "_report.json").read_text())  # missing report rebuilt from _job.json
    assert (rebuilt["rows"], rebuilt["error_rows"], rebuilt["samples_per_item"]) == (5, 1, 2.0)
    assert "skipped" in capsys.readouterr().out
    assert relabel.main(args_for(tmp_path, None, "--force")) == 2
    failed = json.loads((out / "_report.json").read_text())
    assert failed["status"] == "failed" and "does not exist" in failed["error"]


def test_a_run_refused_by_the_lease_writes_nothing_into_the_holders_output(tmp_path):
    """A retried cron pod while the night's run is going: refused, and the running job's report is untouched."""
    from grm_ray import plan, storage

    part = tmp_path / "prefs" / f"dt={DATE}"
    part.mkdir(parents=True)
    pq.write_table(pa.table({"prompt": ["q"], "responses": [["a", "b"]]}), part / "part-0.parquet")
    out = tmp_path / "scored" / f"dt={DATE}"
    out.mkdir(parents=True)
    fs, out_dir = storage.filesystem(str(out))
    holder = plan.Lease(fs, out_dir, expiry=60)
    holder.acquire()
    try:
        assert relabel.main(args_for(tmp_path)) == 2
    finally:
        holder.release()
    assert not (out / "_report.json").exists()


@pytest.mark.ray
@pytest.mark.engine
@pytest.mark.timeout(420)
def test_relabel_once_then_nothing_new_then_a_late_file(local_ray, models, tmp_path, capsys):
    part = tmp_path / "prefs" / f"dt={DATE}"
    part.mkdir(parents=True)
    pq.write_table(pa.table({
        "prompt": ["Name a prime number.", "Say hello.", "Capital of France?", "2 + 2?", "Colour of the sky?",
                   "Bad row"],
        "responses": [["7", "8"], ["hello", "bye"], ["Paris", "Lyon"], ["4", "5"], ["blue", "green"], []],
    }), part / "part-0.parquet")
    out = tmp_path / "scored" / f"dt={DATE}"

    assert relabel.main(args_for(tmp_path, models)) == 0
    report = json.loads((out / "_report.json").read_text())
    assert report["status"] == "complete" and report["date"] == DATE
    assert (report["rows"], report["new_rows"], report["error_rows"]) == (6, 6, 1)
    assert report["generated_tokens"] > 0 and report["wall_seconds"] > 0
    assert report["samples"] == 2 * 5 and report["samples_per_item"] == pytest.approx(10 / 6, abs=1e-3)
    assert json.loads((out / "_job.json").read_text())["status"] == "complete"
    parts = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert sum(pq.read_metadata(out / name).num_rows for name in parts) == 6

    assert relabel.main(args_for(tmp_path, models)) == 0  # the same date again: nothing new, nothing written
    again = json.loads((out / "_report.json").read_text())
    assert again["status"] == "complete" and (again["rows"], again["new_rows"], again["samples"]) == (6, 0, 0)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")} == parts
    assert not [p for p in os.listdir(out) if p.startswith(".tmp-")]

    # a late file lands in the complete partition: the next run scores its rows only
    pq.write_table(pa.table({"prompt": ["Late question?"], "responses": [["yes", "no"]]}), part / "part-1.parquet")
    assert relabel.main(args_for(tmp_path, models)) == 0
    late = json.loads((out / "_report.json").read_text())
    assert (late["rows"], late["new_rows"]) == (7, 1)
    assert sum(pq.read_metadata(p).num_rows for p in out.glob("part-*.parquet")) == 7


def test_reuse_last_finds_the_newest_earlier_complete_date(tmp_path):
    scored = tmp_path / "scored"
    for day, status in (("2025-03-10", "complete"), ("2025-03-12", "complete"), ("2025-03-13", "running"),
                        ("2025-03-14", "complete"), ("2025-03-15", "complete")):
        (scored / f"dt={day}").mkdir(parents=True)
        (scored / f"dt={day}" / "_job.json").write_text(json.dumps({"status": status, "config": {}}))
    (scored / "dt=notadate").mkdir()
    (scored / "dt=notadate" / "_job.json").write_text(json.dumps({"status": "complete"}))
    template = str(scored / "dt={date}") + "/"
    assert relabel.last_complete(template, DATE) == str(scored / "dt=2025-03-12") + "/"
    assert relabel.last_complete(template, "2025-03-10") is None
    args = relabel.parser().parse_args(args_for(tmp_path) + ["--reuse-last"])
    assert relabel.job_config(args, DATE).reuse == str(scored / "dt=2025-03-12")
    assert relabel.job_config(relabel.parser().parse_args(args_for(tmp_path)), DATE).reuse is None
