"""Pipeline test fixtures; the S3 server, Ray and data fixtures are in tests/conftest.py."""
from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from grm_ray.cli import app
from grm_ray.config import JobConfig


@pytest.fixture
def tiny_cfg(tiny_config, tmp_path):
    """A job on the tiny models sized for 2 CPU cores, reading tmp/in and writing tmp/out."""
    def make(**over) -> JobConfig:
        base = dict(input=str(tmp_path / "in"), output=str(tmp_path / "out"), k=4, max_tokens=48,
                    max_model_len=1024, structured=True, batch_size=4, rows_per_file=4, seed=1)
        return tiny_config(**{**base, **over})
    return make


@pytest.fixture
def cli_json():
    """Run a grm-ray command in-process; return (exit code, the last JSON object it printed, at a line start).

    Ray forwards its workers' stdout (vLLM logs of an earlier test's engines, say) to the driver's stdout
    whenever it arrives, so the report need not be all that stdout holds."""
    def invoke(*args: str) -> tuple[int, dict]:
        res = CliRunner().invoke(app, list(args))
        text, decoder = res.stdout, json.JSONDecoder()
        for start in reversed([m.start() for m in re.finditer(r"(?m)^\{", text)]):
            try:
                return res.exit_code, decoder.raw_decode(text, start)[0]
            except json.JSONDecodeError:
                continue
        raise AssertionError(f"no JSON object in the output of grm-ray {' '.join(args)}:\n{res.output}")
    return invoke
