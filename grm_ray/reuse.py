"""Incremental relabelling (`--reuse PREVIOUS_OUTPUT`): rows whose content is unchanged take their label
from a previous output; only new or changed rows reach the engine pools.

A row's content key is the sha256 of its normalised item (messages, responses, label) and a digest of the
result-changing options (plan.RESULT_KEYS except `input`), computed in Normalize and kept in the
output's `content_key` column. Matching is one Ray Data hash join on that key, never a lookup on the driver:

    normalised rows --left outer join on content_key--> previous output (rows without error, one per key)
       matched   -> the previous rewards, samples, ... with reused = true   --\\
       unmatched -> engine pools and Vote (pipeline.add_scoring)           ----> union -> commit

Previous outputs written before `content_key` existed get it computed from their stored messages,
responses and label, with the options of their own `_job.json`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import posixpath
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import storage
from .plan import RESULT_KEYS, JobError
from .schema import CONTENT_KEY, ERROR, LABEL, MESSAGES, NORMALIZED, RESPONSES, REUSED, VOTED

log = logging.getLogger(__name__)
PREV = "_prev_"                      # prefix of the previous output's columns during the join
HIT = PREV + "hit"                   # true on the previous side: a left row with it set was matched
TAKEN = [f for f in VOTED if f.name != ERROR]  # what a reused row takes: rewards ... samples
ROWS_PER_JOIN_PARTITION = 20_000     # join partitions are sized for this many input rows each


def options_digest(config: dict[str, Any]) -> str:
    """sha256 of the result-changing options of a resolved config (`JobConfig.public()` or a `_job.json`'s)."""
    return _sha(_canonical({k: config.get(k) for k in RESULT_KEYS if k != "input"}))


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def content_key(item: dict[str, Any], digest: str) -> str:
    """The row's content key: its normalised item and the options digest, as canonical JSON, hashed.

    >>> content_key({"messages": [{"role": "user", "content": "hi"}], "responses": ["a", "b"], "label": 0}, "d")[:12]
    '299e0cfb5cc8'
    """
    canonical = [item[MESSAGES], item[RESPONSES], item[LABEL], digest]
    return _sha(json.dumps(canonical, sort_keys=True, ensure_ascii=False, separators=(",", ":")))


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def previous_job(cfg: Any) -> tuple[Any, str, dict[str, Any]]:
    """(fs, directory, _job.json) of cfg.reuse; JobError when it is not a grm-ray output (checked before the
    job makes its own output)."""
    fs, prev_dir = storage.filesystem(cfg.reuse, cfg.s3_endpoint_url)
    job = storage.read_json(fs, posixpath.join(prev_dir, storage.JOB_FILE))
    if job is None:
        what = "no such path" if not fs.exists(prev_dir) else f"no {storage.JOB_FILE} there"
        raise JobError(f"--reuse {cfg.reuse}: {what}, so it is not a grm-ray output")
    return fs, prev_dir, job


def previous_parts(cfg: Any) -> tuple[list[str], str]:
    """The committed parts of cfg.reuse and the options digest of the job that wrote them (driver: one listing)."""
    fs, prev_dir, job = previous_job(cfg)
    if job.get("status") != "complete":
        log.warning("--reuse %s: that run is %s; its committed rows are reused all the same",
                    cfg.reuse, job.get("status"))
    now = cfg.public()
    changed = [f"{k} {job['config'].get(k)!r} there, {now.get(k)!r} now" for k in RESULT_KEYS
               if k != "input" and _canonical(job["config"].get(k)) != _canonical(now.get(k))]
    if changed:  # the content keys hold the options: not one row can match
        log.warning("--reuse %s was scored with other result-changing options (%s): none of its rows is "
                    "reused, every row is scored", cfg.reuse, "; ".join(changed))
        return [], options_digest(job["config"])
    parts = storage.committed_parts(fs, prev_dir)
    if not parts:
        log.warning("--reuse %s holds no committed parts; every row is scored", cfg.reuse)
    return [f"s3://{p}" if cfg.reuse.startswith("s3://") else p for p in parts], options_digest(job["config"])


def read_previous(paths: pa.Table, cfg: Any, digest: str) -> Iterator[pa.Table]:
    """Ray Data UDF: a previous part's rows that scored without error, as content_key + `_prev_` columns."""
    for path in paths.column("path").to_pylist():
        fs, bare = storage.filesystem(path, cfg.s3_endpoint_url)
        with fs.open(bare, "rb") as f:
            pf = pq.ParquetFile(f)
            names = set(pf.schema_arrow.names)
            item = [CONTENT_KEY] if CONTENT_KEY in names else [MESSAGES, RESPONSES, LABEL]
            table = pf.read(columns=item + [ERROR] + [c.name for c in TAKEN])
        table = table.filter(pc.is_null(table.column(ERROR)))
        if CONTENT_KEY in names:
            keys = table.column(CONTENT_KEY)
        else:  # written before content keys: computed from the stored item with that job's options
            keys = pa.array([content_key(r, digest) for r in table.select(item).to_pylist()], pa.string())
        out = {CONTENT_KEY: keys, HIT: pa.array([True] * table.num_rows, pa.bool_())}
        out.update({PREV + f.name: table.column(f.name).cast(f.type) for f in TAKEN})
        yield pa.table(out).filter(pc.is_valid(keys))


def _first_per_key(block: pa.Table) -> pa.Table:
    """One previous row per content key (an item scored twice before), so the join cannot duplicate a row.
    Called on whole blocks of a dataset hash-partitioned by the key: a key's rows are all in one block."""
    index = block.select([CONTENT_KEY]).append_column("i", pa.array(range(block.num_rows), pa.int64()))
    first = index.group_by(CONTENT_KEY, use_threads=False).aggregate([("i", "min")]).column("i_min")
    return block.take(first.take(pc.sort_indices(first)))


def split(ds: Any, cfg: Any, passthrough: pa.Schema, rows: int) -> tuple[Any, Any]:
    """Normalised rows -> (rows labelled from cfg.reuse or None, rows left to score or None).

    The join runs (and its result is held in the object store, spilled to disk if large) before scoring
    starts: both branches read it, and a lazy plan would run the join once per branch.
    """
    import ray

    from .pipeline import LIGHT_CPUS

    parts, digest = previous_parts(cfg)
    if not parts:  # (previous_parts said why)
        return None, ds
    prev = ray.data.from_items([{"path": p} for p in parts], override_num_blocks=len(parts))
    prev = prev.map_batches(read_previous, batch_size=1, batch_format="pyarrow", num_cpus=LIGHT_CPUS,
                            fn_kwargs={"cfg": cfg, "digest": digest})
    partitions = max(1, min(1000, math.ceil(rows / ROWS_PER_JOIN_PARTITION)))
    prev = prev.repartition(partitions, keys=[CONTENT_KEY]).map_batches(
        _first_per_key, batch_size=None, batch_format="pyarrow", num_cpus=LIGHT_CPUS)
    left = pa.schema([*passthrough, *NORMALIZED])
    joined = ds.join(prev, "left_outer", num_partitions=partitions, on=(CONTENT_KEY,))
    joined = joined.map_batches(_restore, batch_format="pyarrow", num_cpus=LIGHT_CPUS,
                                fn_kwargs={"left": left}).materialize()
    reused = joined.map_batches(_matched, batch_format="pyarrow", num_cpus=LIGHT_CPUS, fn_kwargs={"left": left})
    todo = joined.map_batches(_unmatched, batch_format="pyarrow", num_cpus=LIGHT_CPUS, fn_kwargs={"left": left})
    if todo.count() == 0:  # a filter pass over the held join; then no engine starts (on a cluster: no GPU node)
        log.info("--reuse %s labels every row; no engine is started", cfg.reuse)
        return reused, None
    return reused, todo


def _restore(table: pa.Table, left: pa.Schema) -> pa.Table:
    """The join's output with the types it had before (the join returns large_string and friends)."""
    prev = [pa.field(HIT, pa.bool_()), *(pa.field(PREV + f.name, f.type) for f in TAKEN)]
    schema = pa.schema([*left, *prev])
    return pa.Table.from_arrays([table.column(f.name).cast(f.type) for f in schema], schema=schema)


def _matched(table: pa.Table, left: pa.Schema) -> pa.Table:
    """Matched rows: the new row's input columns and item, the previous label, reused = true."""
    table = table.filter(pc.is_valid(table.column(HIT)))
    cols = {f.name: table.column(f.name) for f in left}
    cols.update({f.name: table.column(PREV + f.name) for f in TAKEN})
    cols[REUSED] = pa.array([True] * table.num_rows, pa.bool_())
    return pa.table(cols)


def _unmatched(table: pa.Table, left: pa.Schema) -> pa.Table:
    return table.filter(pc.is_null(table.column(HIT))).select(left.names)
