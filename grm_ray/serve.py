"""Online scoring on Ray Serve: the batch job's GRMSampler, MetaScorer and Vote behind `POST /score`.

    POST /score  {"prompt": "Is 7 prime?", "responses": ["Yes.", "No."], "k": 8, "k_meta": 4}
    200          {"rewards": [8.25, 2.5], "best_index": 0, "margin": 5.75, "tie": false, "n_samples": 8, ...,
                  "samples": [{"order": [1, 0], "text": "Specific Criteria: ...", "scores": [8, 3], ...}],
                  "error": null}

Three deployments, each autoscaling between the config's MIN,MAX like the job's actor pools:

    Ingress (CPU: token, validation, vote)  ->  Sampler (GRM engine; grm_actors)  ->  Meta (meta RM; meta_actors)

Engines are built once per replica. A request's k / k_meta only change how the stages use them (a
GRMSampler / Vote over a config copy, sharing the replica's engine). The engines are vLLM's async engine:
a request's samples join the engine's running batch as soon as it arrives, beside requests already
generating (continuous batching), instead of waiting for a batch call to end.
Every bad request gets a 4xx with {"error": message}; the bearer token, when set, is checked first.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from typing import Any, Optional

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from .config import ConfigError, JobConfig, load_config
from .engines import UPSTREAM, ServerFailed
from .schema import ERROR, ID, LABEL, RESPONSES, SAMPLES, SOURCE, VOTED, RowError, normalize
from .stages import GRMSampler, MetaScorer, Vote

log = logging.getLogger(__name__)
APP_NAME = "grm-ray"
TOKEN_ENV = "GRM_RAY_TOKEN"
MAX_K = 64
MAX_BODY_BYTES = 1 << 20  # 1 MiB: far above any sane prompt + responses, small enough to refuse floods
FIELDS = {"prompt", "messages", "responses", "k", "k_meta", "id"}
RESULT_FIELDS = [f.name for f in VOTED]  # rewards, vote_totals, best_index, margin, tie, n_*, samples, error


class BadRequest(Exception):
    """A request we refuse; `status` is the HTTP status, the message says what to fix."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class ScoreRequest:
    row: dict[str, Any]  # the internal row shape (id, source, messages, responses, label, error)
    k: int
    k_meta: Optional[int]


def _int_field(body: dict[str, Any], name: str, low: int, high: int) -> Optional[int]:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"field '{name}' must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise BadRequest(f"field '{name}' must be in {low}..{high}, got {value}")
    return value


def parse_request(body: bytes, cfg: JobConfig) -> ScoreRequest:
    """Validate a /score body strictly; raises BadRequest naming the field.

    >>> parse_request(b'{"prompt": "hi", "responses": ["a", "b"], "k": 2}', JobConfig()).k
    2
    """
    try:
        data = json.loads(body.decode("utf-8"), parse_constant=lambda c: _raise(f"{c} is not valid JSON"))
    except UnicodeDecodeError as e:
        raise BadRequest(f"body is not UTF-8 ({e.reason} at byte {e.start})") from None
    except ValueError as e:  # JSONDecodeError, or NaN / Infinity
        raise BadRequest(f"body is not valid JSON: {e}") from None
    except RecursionError:
        raise BadRequest("body is nested too deeply") from None
    if not isinstance(data, dict):
        raise BadRequest(f"body must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - FIELDS)
    if unknown:
        raise BadRequest(f"unknown field(s) {unknown}; expected {sorted(FIELDS)}")
    if ("prompt" in data) == ("messages" in data):
        raise BadRequest("give exactly one of 'prompt' (a string) or 'messages' (a list of {role, content})")
    if "prompt" in data and not isinstance(data["prompt"], str):
        raise BadRequest(f"field 'prompt' must be a string, got {type(data['prompt']).__name__}")
    if "messages" in data and not isinstance(data["messages"], list):
        raise BadRequest(f"field 'messages' must be a list of {{role, content}}, got {type(data['messages']).__name__}")
    responses = data.get("responses")
    if not isinstance(responses, list) or not responses:
        got = "nothing" if responses is None else ("an empty list" if responses == [] else type(responses).__name__)
        raise BadRequest(f"field 'responses' must be a non-empty list of strings, got {got}")
    for i, r in enumerate(responses):
        if not isinstance(r, str):
            raise BadRequest(f"field 'responses[{i}]' must be a string, got {type(r).__name__}")
    k = _int_field(data, "k", 1, MAX_K)
    k_meta = _int_field(data, "k_meta", 1, k or cfg.k)
    if k_meta is not None and cfg.meta_mode == "none":
        raise BadRequest("field 'k_meta' needs a meta RM; this server votes without one (meta_mode none)")
    k, k_meta = request_k(cfg, k, k_meta)
    item_id = data.get("id")
    if isinstance(item_id, bool) or not isinstance(item_id, (str, int, type(None))):
        raise BadRequest(f"field 'id' must be a string or integer, got {type(item_id).__name__}")
    try:
        row = normalize(data, "responses", cfg.max_responses)
    except RowError as e:
        raise BadRequest(str(e)) from None
    if item_id is None:  # same content, same id: with a fixed seed a repeated request votes the same way
        item_id = "req-" + hashlib.sha256(json.dumps(row, sort_keys=True).encode()).hexdigest()[:16]
    row.update({ID: str(item_id), SOURCE: f"request:{item_id}", ERROR: None})
    row.setdefault(LABEL, None)
    return ScoreRequest(row=row, k=k, k_meta=k_meta)


def _raise(message: str):
    raise ValueError(message)


def request_k(cfg: JobConfig, k: Optional[int], k_meta: Optional[int]) -> tuple[int, Optional[int]]:
    """The request's (k, k_meta), defaults from the server config; k_meta keeps the server's k_meta/k ratio.

    >>> request_k(JobConfig(k=32, k_meta=16, meta_mode="judge"), 8, None)
    (8, 4)
    """
    k = k or cfg.k
    if cfg.meta_mode == "none":
        return k, None
    if k_meta is None:
        k_meta = max(1, round(k * cfg.k_meta / cfg.k)) if cfg.k_meta else None
    return k, k_meta


def request_config(cfg: JobConfig, k: int, k_meta: Optional[int]) -> JobConfig:
    """The server config with this request's k / k_meta (values already checked by parse_request)."""
    return cfg.model_copy(update={"k": k, "k_meta": k_meta})


def bearer_ok(header: Optional[str], token: Optional[str]) -> bool:
    """True when no token is set, or the Authorization header is `Bearer <token>` (constant-time compare)."""
    if not token:
        return True
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def result_json(request: ScoreRequest, voted: dict[str, Any]) -> dict[str, Any]:
    """The output columns of one item, JSON-safe (NaN/inf -> null)."""
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, list):
            return [clean(x) for x in v]
        if isinstance(v, dict):
            return {key: clean(x) for key, x in v.items()}
        return v

    out = {ID: request.row[ID], **{name: voted.get(name) for name in RESULT_FIELDS}}
    out.update(k=request.k, k_meta=request.k_meta)
    return clean(out)


class _EngineReplica:
    """Builds a stage's engine once per replica; requests then await it on the replica's event loop."""

    def __init__(self, cfg_data: dict[str, Any], build):
        self.cfg = JobConfig.model_validate(cfg_data)
        t0 = time.perf_counter()
        self.engine = build(self.cfg)
        log.info("%s engine ready in %.1f s", type(self).__name__, time.perf_counter() - t0)


class Sampler(_EngineReplica):
    """Holds one GRM engine (vLLM's async engine): each request's samples join its running batch at once,
    even while other requests are mid-generation."""

    def __init__(self, cfg_data: dict[str, Any]):
        super().__init__(cfg_data, lambda cfg: GRMSampler(cfg).engine)

    async def sample(self, item: tuple[dict[str, Any], int]) -> dict[str, Any]:
        row, k = item
        (res,) = await GRMSampler(self.cfg.model_copy(update={"k": k}), engine=self.engine).acall([row])
        return {**row, **res}


class Meta(_EngineReplica):
    """Holds one meta RM engine; a request's samples are rated as soon as it arrives."""

    def __init__(self, cfg_data: dict[str, Any]):
        super().__init__(cfg_data, lambda cfg: MetaScorer(cfg).engine)

    async def score(self, row: dict[str, Any]) -> dict[str, Any]:
        (res,) = await MetaScorer(self.cfg, engine=self.engine).acall([row])
        return {**row, **res}


class Ingress:
    """HTTP: bearer token, strict validation, then sampler -> meta -> vote; every failure is JSON."""

    def __init__(self, cfg_data: dict[str, Any], sampler: Any, meta: Any = None, token: Optional[str] = None,
                 timeout_s: float = 600.0):
        self.cfg = JobConfig.model_validate(cfg_data)
        self.sampler, self.meta = sampler, meta
        self._token = token  # never logged or returned
        self.timeout_s = timeout_s

    def __repr__(self) -> str:
        return f"Ingress(model={self.cfg.model!r}, token={'set' if self._token else 'none'})"

    async def __call__(self, request: Request) -> JSONResponse:
        try:
            if not bearer_ok(request.headers.get("authorization"), self._token):
                return JSONResponse({"error": "missing or wrong bearer token (Authorization: Bearer TOKEN)"},
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
            path = request.url.path.rstrip("/") or "/"
            if path == "/healthz":
                return JSONResponse({"status": "ok", "model": self.cfg.model, "meta_mode": self.cfg.meta_mode})
            if path != "/score":
                return JSONResponse({"error": f"no route {path}; POST /score"}, status_code=404)
            if request.method != "POST":
                return JSONResponse({"error": "use POST /score with a JSON body"}, status_code=405,
                                    headers={"Allow": "POST"})
            req = parse_request(await _read_body(request), self.cfg)
            voted = await asyncio.wait_for(self._score(req), timeout=self.timeout_s)
        except BadRequest as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)
        except asyncio.TimeoutError:
            return JSONResponse({"error": f"scoring took longer than {self.timeout_s:.0f} s; retry later or "
                                          "ask for a smaller k"}, status_code=504)
        except Exception as e:  # noqa: BLE001 - an engine failure is the server's fault: say so, keep serving
            cause = getattr(e, "cause", e)  # through a deployment handle: a RayTaskError whose cause is ours
            if isinstance(cause, ServerFailed):  # the GRM server is down or refuses us: a gateway error
                return JSONResponse({"error": str(cause)}, status_code=502)
            log.exception("scoring failed")
            return JSONResponse({"error": f"scoring failed on the server ({type(e).__name__}); see its log"},
                                status_code=500)
        if voted[SAMPLES] is None and voted[ERROR]:  # refused before sampling (a prompt too long), or the
            bad_gateway = voted[ERROR].startswith(UPSTREAM)  # GRM server failed: not the client's fault
            return JSONResponse({"error": voted[ERROR]}, status_code=502 if bad_gateway else 400)
        return JSONResponse(result_json(req, voted))

    async def _score(self, req: ScoreRequest) -> dict[str, Any]:
        row = await self.sampler.sample.remote((req.row, req.k))
        if self.meta is not None and row[ERROR] is None:
            row = await self.meta.score.remote(row)
        cfg = request_config(self.cfg, req.k, req.k_meta)
        voted = Vote(cfg)([{ID: row[ID], RESPONSES: row[RESPONSES], SAMPLES: row[SAMPLES], ERROR: row[ERROR]}])
        return voted[0]


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise BadRequest(f"body is {declared} bytes; the limit is {MAX_BODY_BYTES}", status=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise BadRequest(f"body is over the {MAX_BODY_BYTES}-byte limit", status=413)
        chunks.append(chunk)
    return b"".join(chunks)


def _scaling(pool: tuple[int, int], batch_size: int) -> dict[str, Any]:
    lo, hi = pool
    if lo == hi:
        return {"num_replicas": lo}
    return {"autoscaling_config": {"min_replicas": lo, "max_replicas": hi, "target_ongoing_requests": batch_size}}


def build_app(cfg: JobConfig, token: Optional[str] = None, timeout_s: float = 600.0):
    """The Serve application: Ingress -> Sampler (-> Meta), sized from cfg's pools and resources (Ray is up)."""
    from .pipeline import engine_resources

    engine_opts = {"ray_actor_options": engine_resources(cfg),
                   "max_ongoing_requests": cfg.batch_size * cfg.max_batches_in_flight,
                   "health_check_timeout_s": 120}
    data = cfg.public()
    sampler = serve.deployment(Sampler).options(
        name="GRMSampler", **engine_opts, **_scaling(cfg.grm_actors, cfg.batch_size)).bind(data)
    meta = None
    if cfg.meta_mode != "none":
        meta = serve.deployment(Meta).options(
            name="MetaScorer", **engine_opts, **_scaling(cfg.meta_actors, cfg.batch_size)).bind(data)
    ingress = serve.deployment(Ingress).options(
        name="Ingress", ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=8 * cfg.batch_size,
        autoscaling_config={"min_replicas": 1, "max_replicas": max(2, cfg.grm_actors[1]),
                            "target_ongoing_requests": 4 * cfg.batch_size})
    return ingress.bind(data, sampler, meta, token, timeout_s)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _check_port(host: str, port: int) -> None:
    """A port another process holds, said in one line (Ray Serve's proxy would fail with a traceback)."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            raise ConfigError(f"cannot serve on {host}:{port}: {e.strerror} (another server there? choose "
                              "another with --port)") from None


def serve_command(config: Optional[str] = None, host: str = "127.0.0.1", port: int = 8000,
                  token: Optional[str] = None, detach: bool = False, timeout_s: float = 600.0,
                  **options: Any) -> int:
    """What `grm-ray serve` does: deploy, print the URL, block until Ctrl-C (or return with --detach)."""
    cfg = load_config(config, **options)
    token = token or os.environ.get(TOKEN_ENV) or None
    print("grm-ray serve, resolved config:\n" + json.dumps(cfg.public(), indent=2), flush=True)
    from .pipeline import check_local_setup, init_ray, on_cluster

    if not on_cluster(cfg):  # said before a local Ray starts, not in its tracebacks after
        if detach:
            raise ConfigError("--detach needs a running cluster (--ray-address or RAY_ADDRESS): a local Ray "
                              "stops with this process")
        _check_port(host, port)
        check_local_setup(cfg)  # model paths, the key's variable, an OpenAI-compatible server that cannot serve
    local = init_ray(cfg)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(cfg, token, timeout_s=timeout_s), name=APP_NAME, route_prefix="/")
    print(f"grm-ray serve: POST http://{host}:{port}/score "
          + ("(bearer token required)" if token else "(no token set: anyone who reaches this port can score)"),
          flush=True)
    if detach:
        return 0
    # Ctrl-C or SIGTERM (a container stop) ends the app cleanly, even if the shell started us ignoring SIGINT.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping grm-ray serve", flush=True)
        serve.delete(APP_NAME)
        if local:
            serve.shutdown()
    return 0
