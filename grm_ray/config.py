"""The one typed config of a scoring job: defaults live here, a YAML file and CLI options override them.

Keys are the long option names with dashes as underscores (`--k-meta` -> `k_meta`). Unknown keys and
bad values are rejected with a message naming the key.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


M = TypeVar("M", bound=BaseModel)


def repair_tokens(n: int) -> int:
    """Token budget of a cut sample's repair for n responses: '\\nScores: \\boxed{' (up to ~12 tokens), ~4 per
    score, EOS."""
    return 16 + 4 * n


class ConfigError(ValueError):
    """A config file or option that cannot be used; the message names the key."""


def _pool(value: Any) -> tuple[int, int]:
    """'2' -> (2, 2); '1,4' -> (1, 4); [1, 4] -> (1, 4)."""
    if isinstance(value, int):
        parts = [value]
    elif isinstance(value, str):
        parts = [int(p) for p in value.split(",")]
    elif isinstance(value, (list, tuple)):
        parts = [int(p) for p in value]
    else:
        raise ValueError(f"pool size must be MIN or MIN,MAX, got {value!r}")
    if len(parts) not in (1, 2):
        raise ValueError(f"pool size must be MIN or MIN,MAX, got {value!r}")
    lo, hi = (parts[0], parts[0]) if len(parts) == 1 else parts
    if not 1 <= lo <= hi:
        raise ValueError(f"pool size must be MIN or MIN,MAX with 1 <= MIN <= MAX, got {value!r}")
    return lo, hi


class JobConfig(BaseModel):
    """Everything one `grm-ray score` run needs; saved resolved beside the output."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    input: str = Field("", description="Parquet file, directory, glob or s3:// URI of preference rows.")
    output: str = Field("", description="Directory or s3:// URI for the scored Parquet shards.")
    input_format: Literal["auto", "responses", "dpo", "hh"] = Field(
        "auto", description="Input layout; auto detects it from each file's columns.")
    max_responses: int = Field(16, ge=1, description="Rows with more responses than this get a row error.")
    # GRM sampling
    model: str = Field("BBQGOD/DeepSeek-GRM-27B", description="GRM model name or local path.")
    k: int = Field(8, ge=1, le=4096, description="GRM samples per item (voting@k).")
    temperature: float = Field(0.5, ge=0, description="Sampling temperature (the paper votes at 0.5).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold.")
    max_tokens: int = Field(1024, ge=8, description="Token budget of one GRM sample.")
    max_model_len: Optional[int] = Field(None, ge=64, description="Context length; default the model's own.")
    seed: int = Field(0, ge=0, le=2**32 - 1,
                      description="Seed for sampling and tie-breaks; a rerun with the same seed repeats.")
    structured: bool = Field(False, description="Constrain output so it always ends in a parseable score box.")
    adaptive: Literal["off", "exact", "confident"] = Field(
        "off", description="Sample in rounds and stop items early: exact never changes the winner (no meta RM).")
    risk: float = Field(0.01, gt=0, lt=1, description="For adaptive=confident: allowed chance of a changed winner.")
    hint: bool = Field(False, description="Append 'The best response is: Response X' from the label (RFT data).")
    chat_fallback: Literal["plain", "gemma"] = Field(
        "plain", description="How to render prompts for a model without a chat template.")
    engine: Literal["vllm", "openai"] = Field(
        "vllm", description="GRM engine: vllm (engine actors) or openai (an existing OpenAI-compatible server).")
    base_url: Optional[str] = Field(None, description="For engine=openai: the server's URL, e.g. http://host:8000/v1.")
    api_key_env: Optional[str] = Field(
        None, description="For engine=openai: environment variable holding the API key (never logged).")
    openai_max_concurrency: int = Field(64, ge=1, description="For engine=openai: requests in flight per actor.")
    openai_retries: int = Field(5, ge=0, description="For engine=openai: retries of a 429 / 5xx / timed-out request.")
    # meta RM
    meta_mode: Literal["none", "classifier", "judge"] = Field(
        "none", description="classifier: a sequence-classification meta RM; judge: yes/no logprobs.")
    meta_model: Optional[str] = Field(None, description="Meta RM model name or path (default: the GRM for judge).")
    k_meta: Optional[int] = Field(None, ge=1, description="Samples that vote after meta rating; default k/2.")
    # resources
    grm_actors: tuple[int, int] = Field((1, 1), description="GRM actor pool size, MIN or MIN,MAX (autoscales).")
    meta_actors: tuple[int, int] = Field((1, 1), description="Meta RM actor pool size, MIN or MIN,MAX.")
    device: Literal["auto", "gpu", "cpu"] = Field(
        "auto", description="Where engine actors run. auto: GPUs on a Ray cluster (asked for even before a GPU "
        "node is up, so the autoscaler adds one) and on a local Ray with GPUs; CPU on a local Ray without.")
    gpus_per_actor: Optional[float] = Field(
        None, ge=0, description="GPUs per engine actor when on GPU (>1 = tensor parallel); default 1. 0 = CPU.")
    actor_resources: dict[str, float] = Field(
        default_factory=dict, description='Custom Ray resources per engine actor, JSON: {"node:gpu-a100": 0.01}.')
    cpus_per_actor: float = Field(1, gt=0, description="CPUs reserved per engine actor.")
    gpu_memory_utilization: Optional[float] = Field(
        None, gt=0, le=1, description="vLLM memory share (of CPU memory on CPU); default 0.9 GPU / 0.3 CPU.")
    batch_size: int = Field(32, ge=1, description="Items per batch of an engine actor; larger keeps GPUs busier.")
    max_batches_in_flight: int = Field(
        4, ge=1, description="Batches an engine actor works on at once; their requests share the engine's batch.")
    rows_per_file: int = Field(4096, ge=1, description="Rows per committed output part at most (the resume granularity).")
    part_bytes: int = Field(128 << 20, ge=1 << 10, description="Bytes (in memory) per output part at most, at "
                            "least 1024; a batch larger than this is committed as several parts.")
    unit_rows: int = Field(1024, ge=1, description="Rows per block to the engine pools at most (a unit of the plan), "
                           "so a pool gets many blocks to share; the units of a row group are read in one pass.")
    max_units: int = Field(20_000, ge=1, description="Units a run plans at most: past max_units x unit_rows rows, "
                           "units grow instead, since each one holds ~0.8 KB of Ray Data state on the driver "
                           "(a row group, or a gap between committed ranges, is always at least one unit).")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict,
                                          description="Extra vLLM engine arguments (AsyncEngineArgs keywords).")
    # run
    overwrite: bool = Field(False, description="Delete existing output and start afresh instead of resuming.")
    rescore_changed: bool = Field(False, description="On resume, drop the labels of input files that changed "
                                  "since they were scored and score them again (default: refuse, naming them).")
    lease_expiry: float = Field(180, ge=5, description="Seconds (at least 5) without a heartbeat after which "
                                "another job may take over this output's writer lease.")
    reuse: Optional[str] = Field(None, description="Previous output: rows whose item and result-changing options "
                                 "are unchanged take its labels (reused=true); only the rest are scored.")
    retry_errors: bool = Field(False, description="On a rerun, rescore rows committed with an engine-side error "
                               "(no valid sample, prompt too long, a request the GRM server refused); input errors stay.")
    ray_address: Optional[str] = Field(None, description="Ray cluster to join; default a local Ray.")
    s3_endpoint_url: Optional[str] = Field(None, description="S3-compatible endpoint (else AWS_ENDPOINT_URL).")
    verbose: bool = Field(False, description="Show Ray / vLLM start-up logs and warnings on the console too "
                          "(always in the log file beside the output).")

    @field_validator("grm_actors", "meta_actors", mode="before")
    @classmethod
    def _parse_pool(cls, v: Any) -> tuple[int, int]:
        return _pool(v)

    @field_validator("engine_kwargs", "actor_resources", mode="before")
    @classmethod
    def _parse_json(cls, v: Any) -> Any:
        """The command line gives engine_kwargs as a JSON string."""
        if isinstance(v, str):
            try:
                return json.loads(v)
            except json.JSONDecodeError as e:
                raise ValueError(f"not valid JSON ({e})") from None
        return v

    @model_validator(mode="after")
    def _check(self) -> "JobConfig":
        if self.k_meta is not None and self.k_meta > self.k and self.meta_mode != "none":  # unused without one
            raise ValueError(f"k_meta ({self.k_meta}) cannot exceed k ({self.k})")
        if self.engine == "openai" and not self.base_url:
            raise ValueError("engine=openai needs base_url (the OpenAI-compatible server, e.g. http://host:8000/v1)")
        if self.device == "cpu" and self.gpus_per_actor:
            raise ValueError(f"device=cpu conflicts with gpus_per_actor={self.gpus_per_actor}; drop one")
        if self.device == "gpu" and self.gpus_per_actor == 0:
            raise ValueError("device=gpu conflicts with gpus_per_actor=0 (which means CPU); drop one")
        if self.adaptive != "off" and self.meta_mode != "none":
            raise ValueError(
                f"adaptive={self.adaptive} with meta_mode={self.meta_mode} is refused: the stopping rules watch the "
                "plain vote, while meta-guided voting keeps the top k_meta samples by meta score, which a sample "
                "not yet drawn can change, so an early stop could change the meta-guided winner; use "
                "adaptive=off with a meta RM, or meta_mode=none to stop early")
        if self.max_model_len and self.max_tokens + repair_tokens(self.max_responses) >= self.max_model_len:
            raise ValueError(f"max_tokens ({self.max_tokens}) leaves no room for a prompt in max_model_len "
                             f"({self.max_model_len}; a cut sample's repair needs {repair_tokens(self.max_responses)} "
                             "more): lower max_tokens or raise max_model_len")
        if self.meta_mode == "classifier" and not self.meta_model:
            raise ValueError("meta_mode=classifier needs meta_model (a sequence-classification model)")
        return self

    @property
    def voting_k_meta(self) -> int | None:
        """How many samples vote after meta rating; None = all valid ones (plain voting)."""
        if self.meta_mode == "none":
            return None
        return self.k_meta or max(1, self.k // 2)

    def public(self) -> dict[str, Any]:
        """The resolved config as JSON-safe data, for _job.json and Parquet metadata."""
        return json.loads(self.model_dump_json())


def load_config(path: str | Path | None = None, **overrides: Any) -> JobConfig:
    """Config file (YAML) first, then overrides that are not None; errors name the key."""
    return load_into(JobConfig, "job", path, overrides)


def load_into(model: type[M], what: str, path: str | Path | None, overrides: dict[str, Any]) -> M:
    """A typed config (`model`) from a YAML file and overrides that are not None; errors name the key."""
    data: dict[str, Any] = {}
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read config file {path}: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of option: value")
        data.update(loaded)
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return model(**data)
    except ValidationError as e:  # blame the file only for keys it alone set
        keys = {str(err["loc"][0]) for err in e.errors() if err["loc"]}
        given = {k for k, v in overrides.items() if v is not None}
        src = ("" if not path or (keys and keys <= given) else f" in {path}" if keys and not keys & given
               else f" ({path} and options)")
        raise ConfigError(f"invalid {what} config{src}: {validation_message(e, given)}") from None


def validation_message(e: ValidationError, options: set[str] = frozenset()) -> str:
    """'k: Input should be greater than or equal to 1; foo: ... (unknown key)': every error, naming its key,
    and for keys given as `options` the command-line flag too (`part_bytes (--part-bytes)`)."""
    msgs = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"])  # empty for checks across keys; they name the keys
        if key in options and err["type"] != "extra_forbidden" and key not in ("input", "output", "data"):
            key += f" (--{key.replace('_', '-')})"
        msg = err["msg"].removeprefix("Value error, ")
        msgs.append(f"{key}: {msg}" if key else msg)
        msgs[-1] += " (unknown key)" if err["type"] == "extra_forbidden" else ""
    return "; ".join(msgs)
