"""Shipped job configs load through the one config loader; bad keys and values are named."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from grm_ray.config import ConfigError, load_config

from cluster_util import REPO

CONFIGS = sorted(p for p in (REPO / "jobs" / "configs").glob("*.yaml") if not p.name.startswith("spct-"))
TRAIN_CONFIGS = sorted((REPO / "jobs" / "configs").glob("spct-*.yaml"))  # `grm-ray train` configs
pytestmark = pytest.mark.timeout(60)


def test_shipped_configs_exist():
    assert {p.name for p in CONFIGS} >= {"deepseek-grm-27b.yaml", "cpu-smoke.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path):
    cfg = load_config(path)
    assert cfg.k >= 1
    overridden = load_config(path, max_tokens=cfg.max_tokens + 1)  # a command-line option beats the file
    assert overridden.max_tokens == cfg.max_tokens + 1


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_training_config_loads(path: Path):
    from grm_ray.train import load_train_config

    recipe = path.stem.removeprefix("spct-")  # the `grm-ray train RECIPE` it is for
    cfg = load_train_config(path, recipe=recipe)
    assert cfg.base and cfg.checkpoint_dir
    doubled = load_train_config(path, recipe=recipe, learning_rate=cfg.learning_rate * 2)
    assert doubled.learning_rate == cfg.learning_rate * 2  # a command-line option beats the file


def test_deepseek_config_is_the_paper_setting():
    cfg = load_config(REPO / "jobs" / "configs" / "deepseek-grm-27b.yaml")
    assert (cfg.model, cfg.meta_model) == ("BBQGOD/DeepSeek-GRM-27B", "BBQGOD/DeepSeek-GRM-27B-MetaRM")
    assert (cfg.k, cfg.k_meta, cfg.meta_mode, cfg.temperature) == (32, 16, "classifier", 0.5)
    assert cfg.gpus_per_actor == 1
    assert cfg.grm_actors[0] < cfg.grm_actors[1] and cfg.meta_actors[0] < cfg.meta_actors[1]  # autoscaling


def test_cpu_smoke_config_runs_on_cpu():
    cfg = load_config(REPO / "jobs" / "configs" / "cpu-smoke.yaml")
    assert cfg.device == "cpu" and cfg.structured
    assert cfg.model.endswith("/grm") and cfg.meta_model.endswith("/meta")  # `grm-ray dev tiny-models DIR`


@pytest.mark.parametrize("data, key", [
    ({"k_metta": 4}, "k_metta"),                 # unknown key (typo)
    ({"k": "many"}, "k"),                        # wrong type
    ({"k": 0}, "k"),                             # out of range
    ({"grm_actors": "4,1"}, "grm_actors"),       # MIN > MAX
    ({"meta_mode": "vote"}, "meta_mode"),        # not a choice
])
def test_bad_key_or_value_is_named(tmp_path, data, key):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{key}:" in str(err.value) and str(path) in str(err.value)
    if key == "k_metta":
        assert "unknown key" in str(err.value)


def test_runtime_env_file():
    env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "." and ".git" in env["excludes"]
