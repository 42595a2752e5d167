"""`--retry-errors`: a rerun rescores rows committed with an engine-side error, without duplicating them.

Engine-side errors are those of rows that normalised fine (`content_key` is set): no valid sample, a prompt
longer than the model context (a larger --max-model-len may fit it). Input errors (a bad field, a duplicate
id, an unreadable file) leave `content_key` null and stay: rescoring cannot change them. (Outputs written
before `content_key` existed: `responses`, which input errors left null then.)

Each committed part holding such rows is rewritten without them by plan.rewrite_parts (in Ray tasks, one per
part); its record then no longer lists them, so the plan has them as rows to score, like those an interrupted
run left. A crash in between loses nothing: the next run scores whatever is not committed.
"""
from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import storage
from .plan import rewrite_parts
from .schema import ERROR, read_marker

log = logging.getLogger(__name__)


def engine_errors(table: pa.Table) -> pa.ChunkedArray:
    """Per row: whether it carries an engine-side error (normalised fine, yet no scores)."""
    return pc.and_(pc.is_valid(table.column(ERROR)), pc.is_valid(table.column(read_marker(table.column_names))))


def drop_part_errors(paths: pa.Table, cfg: Any) -> pa.Table:
    """Ray Data UDF: rewrite each part without its engine-error rows (probing two columns first)."""
    fs, _ = storage.filesystem(cfg.output, cfg.s3_endpoint_url)
    dropped = []
    for path in paths.column("path").to_pylist():
        with fs.open(path, "rb") as f:
            names = pq.ParquetFile(f).schema_arrow.names
            probe = storage.read_parquet(f, columns=[ERROR, read_marker(names)])
        dropped.append(rewrite_parts(fs, [path], engine_errors) if pc.any(engine_errors(probe)).as_py() else 0)
    return pa.table({"dropped": pa.array(dropped, pa.int64())})


def drop_engine_errors(cfg: Any, fs: Any, out_dir: str) -> int:
    """Rewrite the committed parts of cfg.output without their engine-error rows; how many were dropped."""
    import ray

    from .pipeline import LIGHT_CPUS, init_ray

    parts = storage.committed_parts(fs, out_dir)
    if not parts:
        return 0
    init_ray(cfg)
    ds = ray.data.from_items([{"path": p} for p in parts], override_num_blocks=len(parts))
    ds = ds.map_batches(drop_part_errors, batch_size=1, batch_format="pyarrow", num_cpus=LIGHT_CPUS,
                        fn_kwargs={"cfg": cfg})
    dropped = sum(pc.sum(b.column("dropped")).as_py() or 0
                  for b in ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    log.info("--retry-errors: %d row(s) with an engine-side error taken out of their parts, to be rescored", dropped)
    return dropped
