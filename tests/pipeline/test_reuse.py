"""--reuse: unchanged rows take the previous output's labels, only new or changed rows are sampled."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grm_ray import storage
from grm_ray.pipeline import run
from grm_ray.reuse import _first_per_key, options_digest, read_previous

pytestmark = [pytest.mark.engine, pytest.mark.ray]


def test_reuse_scores_only_changed_rows(ray_local, tiny_cfg, tmp_path, hh_table):
    inp = tmp_path / "in"
    inp.mkdir()
    base = hh_table.slice(0, 10).append_column("day", pa.array(["mon"] * 10))
    pq.write_table(base, inp / "hh.parquet")
    first = tiny_cfg(input=str(inp), output=str(tmp_path / "mon"), k=2)
    run(first)
    mon = {r["chosen"]: r for r in storage.read_table(first.output).to_pylist()}
    assert not any(r["reused"] for r in mon.values())

    # the next day: row 2's chosen reply edited, one row new, the rest unchanged (and in another order)
    rows = base.to_pylist()
    rows[2]["chosen"] += " (edited)"
    rows.append({**hh_table.slice(20, 1).to_pylist()[0], "day": "tue"})
    for r in rows:
        r["day"] = "tue"
    pq.write_table(pa.Table.from_pylist(rows[::-1]), inp / "hh.parquet")
    second = tiny_cfg(input=str(inp), output=str(tmp_path / "tue"), k=2, reuse=first.output)
    summary = run(second)
    tue = storage.read_table(second.output).to_pylist()

    assert len(tue) == 11 and summary["rows"] == 11 and summary["reused_rows"] == 9
    changed = {rows[2]["chosen"], rows[10]["chosen"]}
    for r in tue:
        assert r["day"] == "tue" and r["error"] is None  # input columns are today's
        if r["chosen"] in changed:
            assert not r["reused"] and r["n_samples"] == 2
        else:
            assert r["reused"], r["source"]
            old = mon[r["chosen"]]
            assert r["content_key"] == old["content_key"]
            for col in ("rewards", "vote_totals", "best_index", "margin", "tie", "samples"):
                assert r[col] == old[col], col
    # tokens of this run are those of the two rows it sampled
    assert summary["generated_tokens"] == sum(
        s["n_tokens"] for r in tue if not r["reused"] for s in r["samples"])
    assert summary["samples"] == 4

    # the day after, nothing changed: every row takes its label and no engine actor is started
    workers = _map_workers()
    third = tiny_cfg(input=str(inp), output=str(tmp_path / "wed"), k=2, reuse=second.output)
    summary = run(third)
    assert summary["rows"] == summary["reused_rows"] == 11 and summary["samples"] == 0
    assert _map_workers() == workers
    assert sorted(r["source"] for r in storage.read_table(third.output).to_pylist()) == sorted(r["source"] for r in tue)


def _map_workers() -> int:
    """Engine actors (Ray Data's `MapWorker(MapBatches(_StageActor))`) this Ray has started, dead ones included."""
    from ray._private.state import state

    return sum("_StageActor" in a.get("ActorClassName", "") for a in state.actor_table(None).values())


def test_previous_output_without_content_keys(tmp_path, tiny_cfg, hh_table):
    """An output written before content keys: keys computed from its stored item and its own job options."""
    from grm_ray.schema import SAMPLED
    from grm_ray.stages import Normalize, Vote, apply

    cfg = tiny_cfg(k=2)
    table = Normalize(cfg)(hh_table.slice(0, 3), "hh.parquet", [0, 1, 2], "hh")
    sample = {"order": [0, 1], "text": "Scores: \\boxed{7, 3}", "scores": [7, 3], "valid": True, "meta_score": None,
              "kept": False, "repaired": False, "hinted": False, "n_tokens": 9}
    table = apply(Vote(cfg), table.append_column(SAMPLED.field("samples"), pa.array([[sample]] * 3,
                                                                                  SAMPLED.field("samples").type)))
    old = table.drop_columns(["content_key"])
    path = tmp_path / "part-old.parquet"
    pq.write_table(old, path)
    prev = next(read_previous(pa.table({"path": [str(path)]}), cfg.model_copy(update={"reuse": str(tmp_path)}),
                              options_digest(cfg.public())))
    assert prev.column("content_key").to_pylist() == table.column("content_key").to_pylist()
    assert prev.column("_prev_rewards").to_pylist() == [[7.0, 3.0]] * 3
    # another job's options give other keys: nothing of it would be reused
    other = options_digest(cfg.model_copy(update={"k": 4}).public())
    assert next(read_previous(pa.table({"path": [str(path)]}), cfg, other)).column("content_key").to_pylist() != \
        table.column("content_key").to_pylist()


def test_one_previous_row_per_key():
    block = pa.table({"content_key": ["a", "b", "a", "c", "b"], "_prev_rewards": [[1.0], [2.0], [3.0], [4.0], [5.0]]})
    assert _first_per_key(block).to_pydict() == {"content_key": ["a", "b", "c"],
                                                 "_prev_rewards": [[1.0], [2.0], [4.0]]}


def test_a_previous_output_of_other_options_is_said_and_not_joined(tmp_path, tiny_cfg, caplog):
    """Rows scored with other result-changing options can never match: the run says which options differ
    and skips the join, instead of scoring every row without a word."""
    from grm_ray.reuse import previous_parts

    prev = tmp_path / "prev"
    prev.mkdir()
    (prev / "part-0.parquet").write_bytes(b"")  # listed only: nothing is read when the options differ
    cfg = tiny_cfg(k=2, reuse=str(prev))
    storage.write_json(storage.filesystem(str(prev))[0], str(prev / storage.JOB_FILE),
                       {"status": "complete", "config": cfg.model_copy(update={"k": 4}).public()})
    with caplog.at_level("WARNING", logger="grm_ray"):
        assert previous_parts(cfg) == ([], options_digest(cfg.model_copy(update={"k": 4}).public()))
    assert "other result-changing options (k 4 there, 2 now)" in caplog.text
    caplog.clear()
    storage.write_json(storage.filesystem(str(prev))[0], str(prev / storage.JOB_FILE),
                       {"status": "complete", "config": cfg.public()})
    assert previous_parts(cfg) == ([str(prev / "part-0.parquet")], options_digest(cfg.public()))
    assert "result-changing" not in caplog.text
