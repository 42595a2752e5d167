"""score_dataset: a user's Ray Dataset scored lazily by the same stages and pools, on a real local Ray."""
from __future__ import annotations

import pytest

from grm_ray import score_dataset
from grm_ray.config import ConfigError
from grm_ray.dataset import row_key

pytestmark = [pytest.mark.engine, pytest.mark.ray]


def options(tiny_config, **over):
    """The session's tiny-model options as keyword arguments, as a user would pass them."""
    base = dict(max_model_len=1024, max_tokens=48, structured=True, k=2, batch_size=4, seed=1)
    return tiny_config(**{**base, **over}).model_dump()


def test_score_dataset_keeps_columns_marks_bad_rows_and_is_lazy(ray_local, tiny_config, hh_table):
    """HH rows (detected) with an extra column and a broken transcript: every row out, inputs kept."""
    rows = hh_table.slice(0, 5).to_pylist()
    rows[3]["chosen"] = "no transcript markers at all"
    for i, r in enumerate(rows):
        r["team"] = f"t{i}"
    ds = ray_local.data.from_items(rows)

    scored = score_dataset(ds, **options(tiny_config))
    assert "MapBatches(vote)" in str(scored)  # a lazy plan: nothing has been scored yet
    out = {r["team"]: r for r in scored.take_all()}

    assert sorted(out) == [f"t{i}" for i in range(5)]
    for i, r in out.items():
        src = rows[int(i[1])]
        assert r["chosen"] == src["chosen"] and r["hh_line"] == src["hh_line"]  # input columns kept
        assert r["source"].startswith("dataset#") and r["id"] == r["source"]
    bad = out["t3"]
    assert bad["error"].startswith(bad["source"].replace("#", ", row ") + ": field 'chosen'")
    assert bad["rewards"] is None and bad["content_key"] is None
    for name in ("t0", "t1", "t2", "t4"):
        r = out[name]
        assert r["error"] is None, r["error"]
        assert r["label"] == 0 and len(r["rewards"]) == 2 and r["n_samples"] == 2
        assert r["chosen"].endswith(r["responses"][0]) and len(r["content_key"]) == 64
    # the key is the row's content, so it is the same in any run, batching or column order
    assert out["t0"]["source"] == "dataset#" + row_key(dict(reversed(list(rows[0].items()))))


def test_score_dataset_checks_options_and_columns(ray_local):
    ds = ray_local.data.from_items([{"prompt": "q", "responses": ["a", "b"]}])
    with pytest.raises(ConfigError, match="k_metta.*unknown key"):
        score_dataset(ds, k_metta=2)
    with pytest.raises(ConfigError, match="temperature"):
        score_dataset(ds, temperature=-1)
    with pytest.raises(ConfigError, match="cannot tell the input format"):
        score_dataset(ray_local.data.from_items([{"question": "q"}]))
    with pytest.raises(ConfigError, match=r"missing column\(s\) \['chosen', 'rejected'\] for input format 'dpo'"):
        score_dataset(ds, input_format="dpo")
