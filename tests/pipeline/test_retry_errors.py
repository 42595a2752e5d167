"""--retry-errors: rows committed with an engine-side error are scored again, once; input errors stay."""
from __future__ import annotations

import collections
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grm_ray import storage
from grm_ray.pipeline import run

pytestmark = [pytest.mark.engine, pytest.mark.ray]


def test_retry_errors_rescores_engine_errors_once(ray_local, tiny_cfg, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    pq.write_table(pa.table({
        "prompt": ["Name a prime number.", "Long: " + "word " * 1200, "Say hello.", "No responses", "2 + 2?"],
        "responses": [["7", "8"], ["a", "b"], ["hello", "bye"], [], ["4", "5"]],
    }), inp / "q.parquet")
    cfg = tiny_cfg(input=str(inp), k=2, rows_per_file=2)  # max_model_len 1024: row 1 does not fit
    run(cfg)
    before = {r["source"]: r for r in storage.read_table(cfg.output).to_pylist()}
    assert "tokens, above the" in before["q.parquet#1"]["error"]
    assert before["q.parquet#3"]["error"] == "q.parquet, row 3: field 'responses' is empty"
    parts = {p: os.path.getmtime(p) for p in storage.committed_parts(*storage.filesystem(cfg.output))}

    # a plain rerun changes nothing; with --retry-errors and a longer context, row 1 is scored
    assert run(cfg)["new_rows"] == 0
    summary = run(cfg.model_copy(update={"retry_errors": True, "max_model_len": 2048}))
    after = storage.read_table(cfg.output).to_pylist()
    assert collections.Counter(r["source"] for r in after) == {s: 1 for s in before}  # each row once
    rows = {r["source"]: r for r in after}
    assert rows["q.parquet#1"]["error"] is None and len(rows["q.parquet#1"]["rewards"]) == 2
    assert rows["q.parquet#3"]["error"] == before["q.parquet#3"]["error"]  # input error: not retried
    for s in ("q.parquet#0", "q.parquet#2", "q.parquet#4"):
        assert rows[s]["samples"] == before[s]["samples"]  # not resampled
    assert summary["new_rows"] == 1 and summary["error_rows"] == 1
    untouched = [p for p, m in parts.items() if os.path.exists(p) and os.path.getmtime(p) == m]
    assert len(untouched) == len(parts) - 1  # only the part that held row 1 was rewritten


def test_only_engine_errors_are_retried():
    from grm_ray.retry import engine_errors

    table = pa.table({"error": [None, "a.parquet, row 1: field 'responses' is empty",
                                "a.parquet, row 2: no valid sample: none of 4 samples ...", None],
                      "responses": [["x", "y"], None, ["x", "y"], None]})
    assert engine_errors(table).to_pylist() == [False, False, True, False]
    # outputs of now: an input error keeps its input's responses; its null content_key marks it
    table = table.set_column(1, "responses", pa.array([["x", "y"], ["x"], ["x", "y"], None]))
    table = table.append_column("content_key", pa.array(["k0", None, "k2", None]))
    assert engine_errors(table).to_pylist() == [False, False, True, False]


def test_error_rows_counted_from_the_error_column(tmp_path):
    """The summary's error_rows reads the `error` leaf's statistics, not those of a column before it."""
    import fsspec

    from grm_ray.plan import error_rows as _error_rows
    from grm_ray.schema import OUTPUT_FIELDS

    rows = [{f.name: None for f in OUTPUT_FIELDS} for _ in range(3)]
    rows[0]["error"] = "a.parquet, row 0: field 'responses' is empty"
    rows[1]["messages"] = [{"role": "user", "content": "q"}]
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema(OUTPUT_FIELDS)), tmp_path / "part-a.parquet")
    assert _error_rows(fsspec.filesystem("file"), str(tmp_path)) == 1
