"""The job config: YAML file + overrides, validation naming the key, pools and k_meta."""
from __future__ import annotations

import json

import pytest

from grm_ray.config import ConfigError, JobConfig, load_config


@pytest.fixture
def write(tmp_path):
    def _write(text: str):
        p = tmp_path / "job.yaml"
        p.write_text(text)
        return p
    return _write


def test_defaults_follow_the_paper():
    cfg = load_config()
    assert cfg.k == 8 and cfg.temperature == 0.5
    assert cfg.meta_mode == "none" and cfg.voting_k_meta is None
    assert cfg.grm_actors == (1, 1) and cfg.meta_actors == (1, 1)
    assert cfg.adaptive == "off" and cfg.structured is False


def test_yaml_then_overrides(write):
    path = write("k: 4\ntemperature: 0.7\nmodel: /models/grm\nstructured: true\n")
    cfg = load_config(path)
    assert (cfg.k, cfg.temperature, cfg.model, cfg.structured) == (4, 0.7, "/models/grm", True)
    cfg = load_config(path, k=16, structured=False, temperature=None, model=None)
    assert cfg.k == 16                  # override wins
    assert cfg.structured is False      # a falsy override still wins
    assert cfg.temperature == 0.7       # None means "not given"
    assert cfg.model == "/models/grm"


def test_empty_yaml_file_is_defaults(write):
    assert load_config(write("")) == load_config()
    assert load_config(write("# only a comment\n")).k == 8


def test_unknown_key_is_rejected_naming_it(write):
    with pytest.raises(ConfigError, match="kk") as e:
        load_config(write("k: 4\nkk: 8\n"))
    assert "unknown key" in str(e.value) and str(write("")) in str(e.value)
    with pytest.raises(ConfigError, match="num_samples"):
        load_config(num_samples=3)


@pytest.mark.parametrize("key, value", [
    ("k", 0),
    ("k", "many"),
    ("temperature", -0.1),
    ("top_p", 0),
    ("top_p", 1.5),
    ("max_tokens", 4),
    ("max_responses", 0),
    ("risk", 1.0),
    ("adaptive", "sometimes"),
    ("meta_mode", "oracle"),
    ("input_format", "csv"),
    ("chat_fallback", "llama"),
    ("k_meta", 0),
    ("batch_size", 0),
    ("grm_actors", "0"),
    ("grm_actors", "4,1"),
    ("grm_actors", "1,2,3"),
    ("grm_actors", "two"),
    ("meta_actors", [3, 1]),
    ("meta_actors", []),
])
def test_bad_values_are_rejected_naming_the_key(key, value):
    with pytest.raises(ConfigError) as e:
        load_config(**{key: value})
    # the complaint starts with the key, and its command-line flag (given as an option here)
    assert f"{key} (--{key.replace('_', '-')}):" in str(e.value)


@pytest.mark.parametrize("text", [
    "grm_actors: 2.5\n",
    "grm_actors: null\n",
])
def test_bad_pool_values_in_yaml_are_config_errors(write, text):
    with pytest.raises(ConfigError, match="grm_actors"):
        load_config(write(text))


@pytest.mark.parametrize("value, pool", [("2", (2, 2)), ("1,4", (1, 4)), (" 1 , 4 ", (1, 4)), ([1, 4], (1, 4)),
                                         (3, (3, 3)), ((2, 5), (2, 5)), (["2", "3"], (2, 3))])
def test_pool_sizes(value, pool):
    assert load_config(grm_actors=value).grm_actors == pool
    assert load_config(meta_actors=value).meta_actors == pool


def test_pool_sizes_from_yaml(write):
    cfg = load_config(write('grm_actors: "1,4"\nmeta_actors: [2, 3]\n'))
    assert cfg.grm_actors == (1, 4) and cfg.meta_actors == (2, 3)
    assert load_config(write("grm_actors: 2\n")).grm_actors == (2, 2)


def test_k_meta_cannot_exceed_k(write):
    with pytest.raises(ConfigError, match="k_meta"):
        load_config(k=4, k_meta=5, meta_mode="judge")
    with pytest.raises(ConfigError, match="k_meta"):
        load_config(write("k: 4\nk_meta: 5\nmeta_mode: judge\n"))
    assert load_config(k=4, k_meta=4, meta_mode="judge").voting_k_meta == 4
    # without a meta RM k_meta is unused: a config file's k_meta does not stop `--meta-mode none --k 1`
    assert load_config(write("k: 4\nk_meta: 2\nmeta_mode: judge\n"), k=1, meta_mode="none").voting_k_meta is None


@pytest.mark.parametrize("adaptive", ["exact", "confident"])
@pytest.mark.parametrize("mode", ["judge", "classifier"])
def test_adaptive_with_a_meta_rm_is_refused_everywhere(write, adaptive, mode):
    """Early stopping watches the plain vote; the meta-guided winner could change, so the combination is refused
    by the one config: YAML, options (the CLI's and Serve's) alike, with what to do instead."""
    with pytest.raises(ConfigError, match="use adaptive=off with a meta RM, or meta_mode=none"):
        load_config(adaptive=adaptive, meta_mode=mode, meta_model="/m/metarm")
    with pytest.raises(ConfigError, match="refused"):
        load_config(write(f"adaptive: {adaptive}\nmeta_mode: {mode}\nmeta_model: /m\n"))
    from grm_ray.serve import serve_command

    with pytest.raises(ConfigError, match="refused"):
        serve_command(None, adaptive=adaptive, meta_mode=mode, meta_model="/m/metarm")
    assert load_config(adaptive=adaptive).adaptive == adaptive
    assert load_config(meta_mode=mode, meta_model="/m").adaptive == "off"


def test_max_tokens_must_leave_room_for_a_prompt_before_any_engine_starts():
    """Caught by the config (the CLI's one-line error), not by each engine actor once it has loaded a model."""
    with pytest.raises(ConfigError, match=r"max_tokens \(64\) leaves no room .* max_model_len \(128"):
        load_config(max_tokens=64, max_model_len=128)
    assert load_config(max_tokens=64, max_model_len=256, max_responses=4).max_model_len == 256


def test_classifier_needs_a_meta_model():
    with pytest.raises(ConfigError, match="meta_model"):
        load_config(meta_mode="classifier")
    assert load_config(meta_mode="classifier", meta_model="/m/metarm").meta_model == "/m/metarm"
    assert load_config(meta_mode="judge").meta_model is None  # judge defaults to the GRM


@pytest.mark.parametrize("k, k_meta, mode, expected", [
    (8, None, "judge", 4),
    (32, None, "classifier", 16),
    (7, None, "judge", 3),
    (1, None, "judge", 1),
    (8, 3, "judge", 3),
    (8, 3, "none", None),
    (8, None, "none", None),
])
def test_voting_k_meta(k, k_meta, mode, expected):
    cfg = load_config(k=k, k_meta=k_meta, meta_mode=mode,
                      meta_model="/m" if mode == "classifier" else None)
    assert cfg.voting_k_meta == expected


def test_bad_yaml_and_non_mapping_files(write, tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write("- k\n- 4\n"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(write("k: [unclosed\n"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_assignment_is_validated_too():
    cfg = load_config()
    with pytest.raises(ValueError):
        cfg.k = 0


def test_public_round_trips_through_json():
    cfg = load_config(k=4, grm_actors="1,3", engine_kwargs={"enforce_eager": True})
    data = cfg.public()
    assert json.loads(json.dumps(data)) == data
    assert JobConfig(**data) == cfg


def test_a_bad_value_is_blamed_on_where_it_came_from(tmp_path):
    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text("k: 0\nmax_tokens: 64\n")
    with pytest.raises(ConfigError, match=f"invalid job config in {cfg_file}: k:"):
        load_config(cfg_file)
    cfg_file.write_text("max_tokens: 64\n")
    with pytest.raises(ConfigError, match=r"invalid job config: k \(--k\):") as e:
        load_config(cfg_file, k=0)
    assert str(cfg_file) not in str(e.value)  # the file is fine; the command line set k


def test_serve_says_a_busy_port_or_a_local_detach_before_starting_ray(monkeypatch):
    """Both are said in one line, before a local Ray starts (they used to end in Ray Serve's tracebacks)."""
    import socket

    import ray

    from grm_ray.serve import serve_command

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    started = ray.is_initialized()  # (a whole test session's Ray may be up already)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot serve on 127.0.0.1:{port}: Address already in use"):
            serve_command(None, port=port)
    with pytest.raises(ConfigError, match="--detach needs a running cluster"):
        serve_command(None, detach=True)
    assert ray.is_initialized() == started
