"""Shared fixtures for pipeline tests: one local S3-compatible server and one local Ray per session."""
from __future__ import annotations

import os
import socket
from importlib import resources

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grm_ray.config import JobConfig


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


@pytest.fixture
def tiny_cfg(tiny_config, tmp_path):
    """A job on the tiny models sized for 2 CPU cores, reading tmp/in and writing tmp/out."""
    def make(**over) -> JobConfig:
        base = dict(input=str(tmp_path / "in"), output=str(tmp_path / "out"), k=4, max_tokens=48,
                    max_model_len=1024, structured=True, batch_size=4, rows_per_file=4, seed=1)
        return tiny_config(**{**base, **over})
    return make
