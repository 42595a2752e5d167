"""The serve ingress's HTTP status for each kind of failed item (pure: a stand-in sampler, no Ray started)."""
from __future__ import annotations

import asyncio
import json

import pytest
from starlette.requests import Request

from grm_ray.config import JobConfig
from grm_ray.schema import ERROR, SAMPLES
from grm_ray.serve import Ingress


class _Remote:
    def __init__(self, fn):
        self.remote = fn


class _Sampler:
    """The Sampler deployment's handle: answers every item with `error` and no samples."""

    def __init__(self, error: str):
        async def sample(item):
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
