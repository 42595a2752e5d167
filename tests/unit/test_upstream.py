"""An OpenAI-compatible GRM server that fails: the check before a job or serve starts (against a stdlib HTTP
server answering /v1/models as vLLM does, or not at all), and serve's HTTP status for each kind of failure
(a stand-in sampler; no Ray, no engine)."""
from __future__ import annotations

import asyncio
import http.server
import json
import socket
import threading

import pytest
from starlette.requests import Request

from grm_ray.config import JobConfig
from grm_ray.engines import ServerFailed, served_context
from grm_ray.schema import ERROR, SAMPLES
from grm_ray.serve import Ingress


class _Remote:
    def __init__(self, fn):
        self.remote = fn


class _Sampler:
    """The Sampler deployment's handle: answers every item with `error` and no samples, or raises `raises`."""

    def __init__(self, error: str = "", raises: Exception | None = None):
        async def sample(item):
            if raises is not None:
                raise raises
            row, _k = item
            return {**row, SAMPLES: None, ERROR: error}
        self.sample = _Remote(sample)


def _post(app, body: dict) -> tuple[int, dict]:
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/score", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json")]}
    resp = asyncio.run(app(Request(scope, receive)))
    return resp.status_code, json.loads(resp.body)


@pytest.mark.parametrize("error, status", [
    ("the OpenAI-compatible server answered 503: Service Unavailable", 502),  # the GRM server's fault: retry
    ("the OpenAI-compatible server could not be reached: APIConnectionError", 502),
    ("prompt is 9000 tokens, above the 4000 that fit the model context", 400),  # the request's own fault
])
def test_a_failed_grm_server_is_a_bad_gateway_not_a_bad_request(error, status):
    app = Ingress(JobConfig().public(), _Sampler(error))
    code, body = _post(app, {"prompt": "Is 7 prime?", "responses": ["Yes", "No"], "k": 2})
    assert (code, body) == (status, {"error": error})


class _Wrapped(Exception):
    """What a deployment handle raises for a replica's exception: Ray's RayTaskError, holding it as `cause`."""

    def __init__(self, cause):
        super().__init__(f"ray::Sampler.sample() failed\n{cause!r}")
        self.cause = cause


def test_a_grm_server_that_cannot_serve_is_a_bad_gateway():
    down = ServerFailed("the OpenAI-compatible server at http://h:1/v1 could not be reached (APIConnectionError)")
    for raised in (down, _Wrapped(down)):
        app = Ingress(JobConfig().public(), _Sampler(raises=raised))
        assert _post(app, {"prompt": "q", "responses": ["a", "b"], "k": 2}) == (502, {"error": str(down)})
    app = Ingress(JobConfig().public(), _Sampler(raises=RuntimeError("engine bug")))  # ours: 500, said so
    assert _post(app, {"prompt": "q", "responses": ["a", "b"], "k": 2})[0] == 500


class _Models(http.server.BaseHTTPRequestHandler):
    """GET /v1/models as vLLM answers it, behind the key 'sk-right'."""

    def do_GET(self):  # noqa: N802
        if self.headers.get("Authorization") != "Bearer sk-right":
            self.send_response(401)
            self.end_headers()
            return
        body = json.dumps({"data": [{"id": "grm", "max_model_len": 2048}, {"id": "judge"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def models_server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Models)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()


def test_the_server_is_checked_once_with_one_line_naming_what_is_wrong(models_server, monkeypatch):
    monkeypatch.setenv("GRM_KEY_T", "sk-right")
    cfg = JobConfig(engine="openai", base_url=models_server, api_key_env="GRM_KEY_T", model="grm")
    assert served_context(cfg) == 2048
    assert served_context(cfg, "judge") is None  # served, context not listed: max_model_len must say it
    with pytest.raises(ServerFailed, match=r"does not serve model 'other' \(it serves: grm, judge\)"):
        served_context(cfg, "other")
    monkeypatch.setenv("GRM_KEY_T", "sk-wrong")
    with pytest.raises(ServerFailed, match=r"answered 401: it refused the key \(\$GRM_KEY_T\)") as e:
        served_context(cfg)
    assert "sk-wrong" not in str(e.value)
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    with pytest.raises(ServerFailed, match="could not be reached .* is it running, and is --base-url right"):
        served_context(cfg.model_copy(update={"base_url": closed}))
