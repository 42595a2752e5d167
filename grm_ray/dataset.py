"""`score_dataset`: the scorer on a user's own Ray Dataset, as `ray.data.llm` processors are called.

    scored = score_dataset(ds, model="BBQGOD/DeepSeek-GRM-27B", k=8)   # lazy: nothing runs yet
    scored.write_parquet("s3://bucket/scored/")                       # the user writes it where they like

The same Normalize, engine pools and Vote as `grm-ray score`; no exactly-once commit (that is the CLI's job).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow as pa

from .config import ConfigError, JobConfig, load_config
from .stages import Normalize, _rows

SOURCE_PREFIX = "dataset"  # source = "dataset#<16 hex of the row's input values>" (the row's stable key)


def score_dataset(ds: Any, **options: Any) -> Any:
    """Score a Ray Dataset of preference rows; returns the scored rows as a lazy `ray.data.Dataset`.

    `ds` holds the input columns of one format (responses / dpo / hh: detected from `ds.schema()`, or
    `input_format=`); `options` are `grm-ray score` options (JobConfig keys: `model`, `k`, `meta_mode`,
    `grm_actors`, ...), checked at call time (a ConfigError names a bad key). Each output row keeps every
    input column and adds the scoring columns (README, Output); a row that cannot be scored carries
    `error`. Rows without an `id` are keyed by their content, so identical rows draw identical samples.
    """
    from .pipeline import LIGHT_CPUS, add_scoring
    from .plan import _format

    cfg = load_config(None, **options)
    if cfg.reuse or cfg.retry_errors:
        raise ConfigError("score_dataset: reuse and retry_errors work on `grm-ray score` outputs only")
    names = ds.schema().names
    fmt, error = _format(cfg, names, "dataset")
    if error:
        raise ConfigError(f"score_dataset: {error.removeprefix('file dataset: ')} (columns: {names})")
    ds = ds.map_batches(normalize_batch, batch_format="pyarrow", num_cpus=LIGHT_CPUS,
                        fn_kwargs={"cfg": cfg, "fmt": fmt})
    return add_scoring(ds, cfg)


def normalize_batch(table: pa.Table, cfg: JobConfig, fmt: str) -> pa.Table:
    """Ray Data UDF: Normalize with a content key for each row in place of a file row number."""
    return Normalize(cfg)(table, SOURCE_PREFIX, [row_key(r) for r in _rows(table)], fmt)


def row_key(row: Any) -> str:
    """16 hex digits of sha256 over a row's input values (any order of columns): stable across runs and
    batchings. A row that could not be read (its error says why) is keyed by that error."""
    text = json.dumps(row, sort_keys=True, default=str, ensure_ascii=False) if isinstance(row, dict) else str(row)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]
