"""`grm-ray serve` over HTTP on 127.0.0.1: the tiny models behind Ray Serve, a bearer token, strict 400s."""
from __future__ import annotations

import concurrent.futures
import json

import pytest
import requests

from cluster_util import REPO, free_port
from grm_ray.config import load_config
from grm_ray.serve import MAX_BODY_BYTES, parse_request, BadRequest

pytestmark = [pytest.mark.ray, pytest.mark.engine]
TOKEN = "test-token-123"
GOOD = {"prompt": "Name a prime number.", "responses": ["7", "8"]}


@pytest.fixture(scope="module")
def server(local_ray, models):
    """The app on the cpu-smoke config (GRM + classifier meta RM, k=4, k_meta=2), one replica each."""
    from ray import serve

    from grm_ray.serve import APP_NAME, build_app

    cfg = load_config(REPO / "jobs" / "configs" / "cpu-smoke.yaml", model=str(models["grm"]),
                      meta_model=str(models["meta"]), max_tokens=48, max_model_len=1024)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(cfg, token=TOKEN, timeout_s=120), name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


def post(url, body, token=TOKEN, raw=False, **kw):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = body if raw else json.dumps(body)
    return requests.post(url + "/score", data=data, headers=headers, timeout=120, **kw)


@pytest.mark.timeout(420)
def test_score_returns_output_columns(server):
    r = post(server, GOOD)
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) >= {"rewards", "vote_totals", "best_index", "margin", "tie", "confidence", "n_samples", "n_valid",
                        "n_kept", "samples", "error", "id", "k", "k_meta"}
    assert out["error"] is None and len(out["rewards"]) == 2 and out["best_index"] in (0, 1)
    assert 0 <= out["confidence"] <= 1
    assert (out["k"], out["k_meta"], out["n_samples"], out["n_kept"]) == (4, 2, 4, 2)
    assert len(out["samples"]) == 4
    for s in out["samples"]:
        assert isinstance(s["text"], str) and s["text"] and s["valid"] and len(s["scores"]) == 2
        assert isinstance(s["meta_score"], float)
    assert sum(s["kept"] for s in out["samples"]) == 2


@pytest.mark.timeout(120)
def test_per_request_k_and_messages(server):
    body = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
            "responses": ["Hello!", "Go away.", "Hi, how can I help?"], "k": 2, "k_meta": 1, "id": "item-1"}
    out = post(server, body).json()
    assert (out["id"], out["k"], out["k_meta"], out["n_samples"], out["n_kept"]) == ("item-1", 2, 1, 2, 1)
    assert len(out["rewards"]) == 3
    out = post(server, {**GOOD, "k": 6}).json()
    assert (out["n_samples"], out["k_meta"]) == (6, 3)  # k_meta keeps the server's k_meta/k ratio


@pytest.mark.timeout(120)
def test_concurrent_requests_are_batched_and_all_answered(server):
    bodies = [{"prompt": f"Question {i}?", "responses": ["yes", "no"], "k": 2 + i % 2} for i in range(6)]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda b: post(server, b), bodies))
    assert [r.status_code for r in results] == [200] * 6
    assert [r.json()["n_samples"] for r in results] == [2 + i % 2 for i in range(6)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("body, message", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"prompt": "hi", "responses": ["a"], "k": NaN}', "not valid JSON"),
    ({"prompt": "hi"}, "'responses' must be a non-empty list"),
    ({"prompt": "hi", "responses": []}, "'responses' must be a non-empty list"),
    ({"prompt": "hi", "responses": "a"}, "'responses' must be a non-empty list"),
    ({"prompt": "hi", "responses": ["a", 2]}, "'responses[1]' must be a string"),
    ({"prompt": 3, "responses": ["a"]}, "'prompt' must be a string"),
    ({"responses": ["a"]}, "exactly one of 'prompt'"),
    ({**GOOD, "messages": []}, "exactly one of 'prompt'"),
    ({"messages": [{"role": "user"}], "responses": ["a"]}, "'messages[0]' has no 'content'"),
    ({**GOOD, "k": 0}, "'k' must be in 1..64"),
    ({**GOOD, "k": 65}, "'k' must be in 1..64"),
    ({**GOOD, "k": "4"}, "'k' must be an integer"),
    ({**GOOD, "k": 2.5}, "'k' must be an integer"),
    ({**GOOD, "k": 2, "k_meta": 3}, "'k_meta' must be in 1..2, got 3"),
    ({**GOOD, "k_meta": 0}, "'k_meta' must be in 1.."),
    ({**GOOD, "temperature": 1}, "unknown field"),
    ({"prompt": "Too long: " + "word " * 3000, "responses": ["a", "b"]}, "tokens, above the"),
])
def test_malformed_requests_get_400(server, body, message):
    r = post(server, body, raw=isinstance(body, bytes))
    assert r.status_code == 400, (r.status_code, r.text)
    assert message in r.json()["error"]


@pytest.mark.timeout(60)
def test_oversized_body_is_refused(server):
    r = post(server, b"{" + b" " * (MAX_BODY_BYTES + 1) + b"}", raw=True)
    assert r.status_code == 413 and "limit" in r.json()["error"]


@pytest.mark.timeout(60)
def test_token_is_required(server):
    for token in (None, "wrong-token"):
        r = post(server, GOOD, token=token)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
        assert TOKEN not in r.text
    r = requests.get(server + "/healthz", timeout=30)
    assert r.status_code == 401
    r = requests.get(server + "/healthz", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert requests.get(server + "/score", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30).status_code == 405
    assert requests.get(server + "/nope", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30).status_code == 404


def test_parse_request_without_a_server():
    cfg = load_config(REPO / "jobs" / "configs" / "cpu-smoke.yaml")
    req = parse_request(json.dumps(GOOD).encode(), cfg)
    assert (req.k, req.k_meta, req.row["responses"]) == (4, 2, ["7", "8"])
    assert req.row["id"] == parse_request(json.dumps(GOOD).encode(), cfg).row["id"]  # same content, same id
    with pytest.raises(BadRequest, match="k_meta' needs a meta RM"):
        parse_request(json.dumps({**GOOD, "k_meta": 1}).encode(), cfg.model_copy(update={"meta_mode": "none"}))


@pytest.mark.timeout(420)
def test_serve_command_blocks_until_sigterm(models, tmp_path):
    """The command path: its own local Ray, token from $GRM_RAY_TOKEN (never printed), SIGTERM stops it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    port, token = free_port(), "env-token-456"
    code = ("import sys; from grm_ray.serve import serve_command; "
            f"sys.exit(serve_command({str(REPO / 'jobs' / 'configs' / 'cpu-smoke.yaml')!r}, port={port}, "
            f"model={str(models['grm'])!r}, meta_mode='none', max_tokens=48, max_model_len=1024))")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["GRM_RAY_TOKEN"] = token
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {token}"}
        deadline = time.monotonic() + 300  # the command prints the URL once the app is deployed
        while "(bearer token required)" not in open(tmp_path / "serve.log").read():
            assert proc.poll() is None, open(tmp_path / "serve.log").read()[-3000:]
            assert time.monotonic() < deadline, "grm-ray serve did not come up in 300 s"
            time.sleep(2)
        assert requests.get(url + "/healthz", headers=auth, timeout=30).status_code == 200
        r = requests.post(url + "/score", json=GOOD, headers=auth, timeout=120)
        assert r.status_code == 200 and r.json()["n_samples"] == 4 and r.json()["k_meta"] is None
        assert requests.post(url + "/score", json=GOOD, timeout=30).status_code == 401
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = open(tmp_path / "serve.log").read()
    assert f"POST http://127.0.0.1:{port}/score (bearer token required)" in output
    assert token not in output
