"""`grm-ray submit` against a real Ray head started here (`ray start --head` on 127.0.0.1).

One cluster for the module: a job that fails fast on the cluster (exit status propagates), and a real
scoring run on the tiny models uploaded with the shipped cpu-smoke config. No ray.init in this process.
"""
from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster_util import REPO, RayHead
from grm_ray import submit

SMOKE = str(REPO / "jobs" / "configs" / "cpu-smoke.yaml")


def test_bad_option_fails_before_submitting(capsys):
    code = submit.submit_command(["/in", "/out", "--k-meta", "9", "--k", "4", "--meta-mode", "judge"],
                                 address="http://127.0.0.1:9")  # nothing listens there: never contacted
    assert code == 2
    assert "k_meta (9) cannot exceed k (4)" in capsys.readouterr().err
    assert submit.submit_command(["/in", "/out", "--no-such-option", "1"], address="http://127.0.0.1:9") == 2
    assert "--no-such-option" in capsys.readouterr().err


def test_needs_an_address(monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert submit.submit_command(["/in", "/out"]) == 2
    assert "--address" in capsys.readouterr().err


def test_staged_working_dir_holds_config_and_package():
    staged = submit.stage_working_dir(SMOKE)
    try:
        assert (staged / "job.yaml").read_text() == open(SMOKE).read()
        assert (staged / "grm_ray" / "cli.py").is_file() and not list(staged.rglob("__pycache__"))
    finally:
        import shutil
        shutil.rmtree(staged)
    staged = submit.stage_working_dir(SMOKE, include_package=False)
    try:
        assert sorted(p.name for p in staged.iterdir()) == ["job.yaml"]
    finally:
        import shutil
        shutil.rmtree(staged)


def test_entrypoint_is_quoted():
    ep = submit.entrypoint(["/data/my prefs/", "s3://b/out/", "--k", "4"], with_config=True)
    assert ep == "python -m grm_ray.cli score --config job.yaml '/data/my prefs/' s3://b/out/ --k 4"


@pytest.fixture(scope="module")
def ray_head():
    head = RayHead(num_cpus=2)
    try:
        head.wait_ready(timeout=120)
        yield head
    finally:
        head.stop()


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_failed_job_returns_its_exit_status(ray_head, tmp_path, monkeypatch, capsys):
    from ray.job_submission import JobSubmissionClient

    monkeypatch.setenv("RAY_ADDRESS", ray_head.address)  # --address defaults to $RAY_ADDRESS
    code = submit.submit_command([str(tmp_path / "missing"), str(tmp_path / "out"), "--k", "2"], wait=True)
    out = capsys.readouterr()
    assert code == 2, out.err  # `grm-ray score` exits 2 on a missing input; the job's status says so
    job_id = out.out.strip().splitlines()[0]
    assert job_id.startswith("raysubmit_")
    assert "does not exist" in out.out  # the followed log
    assert str(JobSubmissionClient(ray_head.address).get_job_status(job_id)) in ("FAILED", "JobStatus.FAILED")


@pytest.mark.ray
@pytest.mark.engine
@pytest.mark.timeout(420)
def test_real_scoring_job_on_tiny_models(ray_head, models, tmp_path, capsys):
    inp = tmp_path / "prefs.parquet"
    pq.write_table(pa.table({
        "prompt": ["Name a prime number.", "Say hello politely.", "What is 2 + 2?"],
        "responses": [["7", "8"], ["Hello, nice to meet you.", "hey"], ["4", "5", "22"]],
    }), inp)
    out_dir = tmp_path / "scored"
    args = [str(inp), str(out_dir), "--model", str(models["grm"]), "--meta-mode", "none", "--k", "2",
            "--max-tokens", "48", "--max-model-len", "1024"]
    code = submit.submit_command(args, address=ray_head.address, config=SMOKE, wait=True,
                                 env=["VLLM_LOGGING_LEVEL=WARNING"])
    logs = capsys.readouterr()
    assert code == 0, logs.out[-4000:] + logs.err[-2000:]
    job = json.loads((out_dir / "_job.json").read_text())
    assert job["status"] == "complete" and job["summary"]["rows"] == 3
    assert job["config"]["k"] == 2 and job["config"]["structured"] is True  # the CLI over the uploaded file
    table = pq.read_table([str(p) for p in out_dir.glob("part-*.parquet")][0])
    assert table.num_rows == 3
    assert os.path.basename(SMOKE) not in logs.err  # nothing odd on stderr about the config


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_nightly_relabel_via_ray_job_submit(ray_head, tmp_path):
    """The cron line of the README: `ray job submit --runtime-env jobs/runtime_env.yaml -- python jobs/relabel.py`.

    The date is already complete, so the job only proves the entrypoint runs from the uploaded checkout:
    it skips (exit 0) and rebuilds the missing report from _job.json.
    """
    import subprocess

    out = tmp_path / "scored" / "dt=2025-01-02"
    out.mkdir(parents=True)
    (out / "_job.json").write_text(json.dumps({"status": "complete", "config": {}, "summary": {
        "rows": 4, "new_rows": 4, "error_rows": 0, "samples": 8, "generated_tokens": 100, "wall_seconds": 3.0}}))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = ["ray", "job", "submit", f"--address={ray_head.address}", "--runtime-env", "jobs/runtime_env.yaml",
           "--", "python", "jobs/relabel.py", "--date", "2025-01-02", "--config", "jobs/configs/cpu-smoke.yaml",
           "--input", str(tmp_path / "prefs" / "dt={date}"), "--output", str(tmp_path / "scored" / "dt={date}")]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=150)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert '"skipped": true' in r.stdout
    report = json.loads((out / "_report.json").read_text())
    assert (report["date"], report["rows"], report["samples_per_item"]) == ("2025-01-02", 4, 2.0)
