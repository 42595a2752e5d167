"""`--engine openai`: GRMSampler on an OpenAI-compatible server, a real `vllm serve` of the tiny GRM on
127.0.0.1 (started once for this module, with an API key)."""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time

import pytest
import requests

from grm_ray import schema as S
from grm_ray.stages import GRMSampler

pytestmark = pytest.mark.engine
KEY = "sk-grm-ray-openai-test-5f3c9a"
KEY_ENV = "GRM_RAY_TEST_OPENAI_KEY"


@pytest.fixture(scope="module")
def openai_server(tiny_models, tmp_path_factory):
    """`vllm serve` of the tiny GRM (API key required); yields its base URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tmp_path_factory.mktemp("vllm-serve") / "serve.log"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_models["grm"]),
           "--host", "127.0.0.1", "--port", str(port), "--api-key", KEY, "--max-model-len", "1024",
           "--kv-cache-memory-bytes", str(64 << 20), "--enforce-eager", "--no-enable-chunked-prefill",
           "--structured-outputs-config", '{"backend": "guidance"}']
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"vllm serve exited: {log.read_text()[-3000:]}"
            try:
                if requests.get(url + "/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(1)
        else:
            pytest.fail(f"vllm serve did not come up in 600 s: {log.read_text()[-3000:]}")
        os.environ[KEY_ENV] = KEY
        yield url + "/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def rows():
    return [{S.ID: f"r{i}", S.MESSAGES: [{"role": "user", "content": f"Is {i} prime?"}],
             S.RESPONSES: ["Yes.", "No.", "Maybe."][: 2 + i % 2], S.LABEL: None, S.ERROR: None} for i in range(3)]


def test_openai_engine_samples_repairs_and_repeats(openai_server, tiny_config, caplog):
    caplog.set_level(logging.DEBUG)
    cfg = tiny_config(engine="openai", base_url=openai_server, api_key_env=KEY_ENV, k=4, max_tokens=32,
                      max_model_len=None, seed=3)
    stage = GRMSampler(cfg)
    assert stage.engine.max_model_len == 1024  # read from the server's /v1/models
    out = stage(rows())
    again = GRMSampler(cfg)(rows())
    assert [[s["text"] for s in r[S.SAMPLES]] for r in out] == [[s["text"] for s in r[S.SAMPLES]] for r in again]
    for row, res in zip(rows(), out):
        assert res[S.ERROR] is None and len(res[S.SAMPLES]) == 4
        n = len(row[S.RESPONSES])
        for s in res[S.SAMPLES]:
            assert sorted(s["order"]) == list(range(n))
            # the random model runs into max_tokens; the repair (forced to the score box) finishes it
            assert s["repaired"] and s["valid"] and len(s["scores"]) == n, s["text"]
            assert s["n_tokens"] > 32
    other = GRMSampler(tiny_config(engine="openai", base_url=openai_server, api_key_env=KEY_ENV, k=4,
                                   max_tokens=32, max_model_len=None, seed=4))(rows()[:1])
    assert [s["text"] for s in other[0][S.SAMPLES]] != [s["text"] for s in out[0][S.SAMPLES]]
    assert KEY not in caplog.text and KEY not in repr(out)


def test_a_server_that_refuses_the_key_stops_the_batch_and_never_labels_a_row(openai_server, tiny_config,
                                                                               monkeypatch, caplog):
    """A refused key (or a server gone) is the server's failure, not the rows': at start one error naming it,
    mid-run the batch fails (the job stops, a rerun resumes) instead of committing every row as an error."""
    from grm_ray.engines import ServerFailed

    caplog.set_level(logging.DEBUG)
    cfg = tiny_config(engine="openai", base_url=openai_server, api_key_env=KEY_ENV, k=2, max_tokens=8,
                      openai_retries=0)
    stage = GRMSampler(cfg)  # the right key: the server checks out
    monkeypatch.setenv(KEY_ENV, "sk-wrong-key-7d1e")
    with pytest.raises(ServerFailed, match="answered 401: it refused the key"):
        GRMSampler(cfg)
    stage.engine.client.api_key = "sk-wrong-key-7d1e"  # the key revoked mid-run
    with pytest.raises(ServerFailed, match="answered 401"):
        stage(rows()[:2])
    assert "sk-wrong-key-7d1e" not in caplog.text
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ValueError, match=f"api_key_env names {KEY_ENV}, but"):
        GRMSampler(cfg)


def test_openai_judge_reads_yes_no_logprobs(openai_server, tiny_config):
    import math

    from grm_ray.stages import MetaScorer

    cfg = tiny_config(engine="openai", base_url=openai_server, api_key_env=KEY_ENV, meta_mode="judge",
                      max_model_len=None)
    judge = MetaScorer(cfg).engine
    conv = [{"role": "user", "content": "Is 7 prime?"}]
    items = [(conv, ["Yes.", "No."], f"Analysis: take {i}.\nScores: \\boxed{{{i + 1}, 3}}") for i in range(3)]
    scores = judge.score(items)
    assert all(math.isfinite(x) for x in scores) and len(set(scores)) == 3
    assert judge.score(items[:1]) == pytest.approx(scores[:1], abs=1e-4)  # greedy, repeatable
