"""Fixtures for the cluster-facing tests: the tiny models and a local Ray."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def models(request, tmp_path_factory):
    """{'grm': path, 'meta': path}: the session's `tiny_models` when tests/conftest.py has it, else built here."""
    try:
        return request.getfixturevalue("tiny_models")
    except pytest.FixtureLookupError:
        from grm_ray.devmodels import build_tiny_models

        return build_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="module")
def local_ray():
    """The session's Ray when another module started one, else a local Ray for this module only."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()
