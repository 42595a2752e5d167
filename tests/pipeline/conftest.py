"""Pipeline test fixtures; the S3 server, Ray and data fixtures are in tests/conftest.py."""
from __future__ import annotations

import pytest

from grm_ray.config import JobConfig


@pytest.fixture
def tiny_cfg(tiny_config, tmp_path):
    """A job on the tiny models sized for 2 CPU cores, reading tmp/in and writing tmp/out."""
    def make(**over) -> JobConfig:
        base = dict(input=str(tmp_path / "in"), output=str(tmp_path / "out"), k=4, max_tokens=48,
                    max_model_len=1024, structured=True, batch_size=4, rows_per_file=4, seed=1)
        return tiny_config(**{**base, **over})
    return make
