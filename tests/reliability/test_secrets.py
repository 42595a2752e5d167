"""Secrets: S3 credentials and the serve token never appear in logs, `_job.json`, Parquet files (metadata
included) or error messages. The runs get distinctive values; every artefact is grepped for them as bytes.
"""
from __future__ import annotations

import json
import types
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import requests

import rel_stages
from rel_util import SECRETS, free_port
from grm_ray import storage

pytestmark = [pytest.mark.ray]


def scan(files: dict[str, bytes], needles: list[str]) -> dict[str, list[str]]:
    """{needle: [names of the artefacts that contain it]}, for the needles found anywhere."""
    hits: dict[str, list[str]] = {}
    for name, data in files.items():
        for n in needles:
            if n.encode() in data:
                hits.setdefault(n, []).append(name)
    return hits


def tree(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


@pytest.mark.engine
@pytest.mark.timeout(1200)  # includes the cli_crash_run fixture when this module runs first
def test_s3_credentials_never_written(cli_crash_run):
    """Three real CLI runs (killed, resumed, failing before Ray starts) with AWS_SECRET_ACCESS_KEY and
    AWS_SESSION_TOKEN set: driver stdout/stderr and log files, the Ray session dirs (all logs), _job.json, every part file
    and its Parquet metadata, and the failing run's error message."""
    run = cli_crash_run
    fs = run["fs"]
    out = run["output"][5:].rstrip("/")
    artefacts = {**tree(run["log_dir"]), **tree(run["ray_tmp"])}
    artefacts["_job.json"] = fs.cat(f"{out}/_job.json")
    for f in run["log_files"]:  # the console's log files (Ray / vLLM output of the runs)
        artefacts[str(f)] = f.read_bytes()
    for p in storage.committed_parts(fs, out):
        artefacts[p] = fs.cat(p)
        meta = pq.read_schema(fs.open(p, "rb")).metadata or {}
        artefacts[p + " (key-value metadata)"] = json.dumps({k.decode(): v.decode() for k, v in meta.items()}).encode()
    failing = run["failing"].stderr
    assert run["failing_rc"] == 2 and "error: output bucket s3://missing-" in failing, failing[-2000:]
    artefacts["error message of the failing run"] = failing.encode()

    # the scan saw the runs: their logs, Ray's session logs of three sessions, and the job record
    sessions = list(run["ray_tmp"].glob("ray/session_2*"))
    assert len(sessions) == 2, sessions  # runs 1 and 2; run 3 fails before it starts Ray
    assert sum(len(v) for v in artefacts.values()) > 100_000 and len(artefacts) > 30
    assert scan(artefacts, [run["output"].split("/")[2]]), "the scan should at least find the bucket name"

    assert scan(artefacts, list(SECRETS.values())) == {}
    print(f"\nRESULT secrets (S3): {len(artefacts)} artefacts, {sum(map(len, artefacts.values())) >> 10} KiB, "
          "no credential found")


@pytest.mark.engine
@pytest.mark.timeout(600)
def test_serve_token_never_logged_or_returned(ray_local, tiny_config, monkeypatch):
    """The product's Serve app (serve.build_app: Ingress with its token, the GRM Sampler on the tiny model's
    real engine) answers 401/400/500/200 without echoing the token; nothing in this Ray session's logs (Serve
    controller, proxy, replicas, vLLM) holds it. The 500 comes from a Sampler whose batch raises when a
    request's first response is "RAISE" (rel_stages.failing_serve_sampler); every other request is sampled."""
    from ray import serve

    from grm_ray import serve as grm_serve

    rel_stages.by_value()
    # build_app as it is, with the failing Sampler swapped in where it makes the deployment (patching the
    # module's `Sampler` instead would make cloudpickle ship a copy of the real class by value)
    failing = rel_stages.failing_serve_sampler("RAISE")
    monkeypatch.setattr(grm_serve, "serve", types.SimpleNamespace(deployment=lambda cls, *a, **kw: serve.deployment(
        failing if cls is grm_serve.Sampler else cls, *a, **kw)))
    token = f"relSERVEtoken-{uuid.uuid4().hex}"
    cfg = tiny_config(k=2, max_tokens=48, max_model_len=1024, structured=True, batch_size=4, seed=1)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    replies = []
    try:
        serve.run(grm_serve.build_app(cfg, token, timeout_s=120), name=grm_serve.APP_NAME + "-secrets",
                  route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        good = {"prompt": "Is 7 prime?", "responses": ["Yes.", "No."]}
        for headers, body, status in [
            ({}, good, 401),
            ({"Authorization": "Bearer wrong-" + token[:8]}, good, 401),
            ({"Authorization": "Basic " + token}, good, 401),
            ({"Authorization": f"Bearer {token}"}, {"prompt": "hi"}, 400),
            ({"Authorization": f"Bearer {token}"}, {"prompt": "hi", "responses": ["RAISE", "b"]}, 500),
            ({"Authorization": f"Bearer {token}"}, good, 200),
        ]:
            r = requests.post(url + "/score", json=body, headers=headers, timeout=120)
            assert r.status_code == status, (status, r.status_code, r.text)
            replies.append(f"{r.status_code} {dict(r.headers)} {r.text}")
        scored = r.json()  # the last, authorised request was scored by the engine
        assert scored["n_samples"] == 2 and scored["error"] is None and len(scored["rewards"]) == 2
        assert all(s["valid"] and s["text"] for s in scored["samples"])
        assert "scoring failed on the server" in replies[-2]
    finally:
        serve.shutdown()
    assert all(token not in r for r in replies)
    logs = Path(ray_local._private.worker._global_node.get_logs_dir_path())
    artefacts = tree(logs)
    assert any("serve" in name for name in artefacts), "expected Serve's logs in the session dir"
    assert scan(artefacts, [token]) == {}
    print(f"\nRESULT secrets (serve token): 6 replies and {len(artefacts)} Ray session log files, no token")
