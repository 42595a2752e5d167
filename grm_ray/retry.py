"""`--retry-errors`: a rerun rescores rows committed with an engine-side error, without duplicating them.

Engine-side errors are those of rows that normalised fine (`responses` is set): no valid sample, a prompt
longer than the model context (a larger --max-model-len may fit it). Input errors (a bad field, a duplicate
id, an unreadable file) leave `responses` null and stay: rescoring cannot change them.

Each committed part holding such rows is rewritten in place without them (temporary file, then a rename
over the same name: atomic on local disks and S3), in Ray tasks, one per part. The dropped rows are then
simply not done, so the run scores them like any row left by an interrupted run; a crash between the
rewrite and their new commit loses nothing (the rerun scores them again).
"""
from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import storage
from .schema import ERROR, RESPONSES

log = logging.getLogger(__name__)


def engine_errors(table: pa.Table) -> pa.ChunkedArray:
    """Per row: whether it carries an engine-side error (normalised fine, yet no scores)."""
    return pc.and_(pc.is_valid(table.column(ERROR)), pc.is_valid(table.column(RESPONSES)))


def drop_part_errors(paths: pa.Table, cfg: Any) -> pa.Table:
    """Ray Data UDF: rewrite each part without its engine-error rows; returns how many each dropped."""
    dropped = []
    for path in paths.column("path").to_pylist():
        fs, _ = storage.filesystem(cfg.output, cfg.s3_endpoint_url)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            probe = pf.read(columns=[ERROR, RESPONSES])
        bad = engine_errors(probe)
        dropped.append(pc.sum(bad).as_py() or 0)
        if not dropped[-1]:
            continue
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)  # schema metadata (the job record) comes with it
        keep = table.filter(pc.invert(bad))
        if keep.num_rows:
            storage.rewrite_part(fs, path, keep)
        else:
            fs.rm(path)
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
