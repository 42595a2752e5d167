"""Session fixtures: the tiny models, a JobConfig factory for them, and the engines (started once each).

VLLM_ENABLE_V1_MULTIPROCESSING=0, as the pipeline's CPU actors set it: the engine core (AsyncLLM's child
process) runs the model itself instead of spawning a worker process for it; Ray workers started from here
inherit the setting.
"""
import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import socket  # noqa: E402
from importlib import resources  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402

from grm_ray.config import JobConfig  # noqa: E402
from grm_ray.devmodels import build_tiny_models, default_cache_dir  # noqa: E402

# A 64 MiB KV cache (65k tokens of the tiny model) per engine, so several engines fit beside each other;
# eager mode skips torch.compile, which costs more than it saves on a 2-layer model.
TINY_ENGINE_KWARGS = {"kv_cache_memory_bytes": 64 << 20, "enforce_eager": True}


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Path]:
    """{'grm': random Llama GRM dir, 'meta': its sequence-classification twin}, cached in $GRM_RAY_CACHE/tiny."""
    return build_tiny_models(default_cache_dir() / "tiny")


@pytest.fixture(scope="session")
def tiny_config(tiny_models) -> Callable[..., JobConfig]:
    """Factory: a JobConfig on the tiny models with test-sized engines; keyword overrides win."""

    def make(**overrides: Any) -> JobConfig:
        base = dict(model=str(tiny_models["grm"]), max_model_len=2048, max_tokens=256,
                    engine_kwargs=dict(TINY_ENGINE_KWARGS))
        return JobConfig(**{**base, **overrides})

    return make


@pytest.fixture(scope="session")
def grm_engine(tiny_config):
    """Unstructured GRM engine: random text, nearly always cut at max_tokens (kept small for speed)."""
    pytest.importorskip("vllm")
    from grm_ray.engines import GRMEngine

    return GRMEngine(tiny_config(max_tokens=64))


@pytest.fixture(scope="session")
def grm_engine_structured(tiny_config):
    """Structured GRM engine. Stats off: a second engine with stats on would reset the first one's
    process-wide prefix-cache counters (see GRMEngine.prefix_cache_stats)."""
    pytest.importorskip("vllm")
    from grm_ray.engines import GRMEngine

    cfg = tiny_config(structured=True, max_tokens=512,
                      engine_kwargs={**TINY_ENGINE_KWARGS, "disable_log_stats": True})
    return GRMEngine(cfg)


@pytest.fixture(scope="session")
def meta_engine_classifier(tiny_config, tiny_models):
    pytest.importorskip("vllm")
    from grm_ray.engines import MetaEngine

    return MetaEngine(tiny_config(meta_mode="classifier", meta_model=str(tiny_models["meta"])))


@pytest.fixture(scope="session")
def meta_engine_judge(tiny_config):
    """Judge on the tiny GRM; max_logprobs=-1 lets tests read the full distribution to cross-check."""
    pytest.importorskip("vllm")
    from grm_ray.engines import MetaEngine

    return MetaEngine(tiny_config(meta_mode="judge",
                                  engine_kwargs={**TINY_ENGINE_KWARGS, "max_logprobs": -1}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1; credentials set before Ray starts so workers inherit them."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing-secret",
                      AWS_DEFAULT_REGION="us-east-1")
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session")
def ray_local(s3_endpoint):
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def hh_table() -> pa.Table:
    """Real HH-RLHF rows packaged with grm-ray (short transcripts)."""
    return pq.read_table(str(resources.files("grm_ray") / "data" / "hh_rlhf_harmless_demo.parquet"))
