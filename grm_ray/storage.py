"""Where rows come from and where they go: local paths or s3:// URIs, and the exactly-once commit.

Output protocol: each scored batch is written to a hidden temporary name and then renamed to
`part-<hash of its sources>.parquet`, so a file under a `part-` name is always complete. A rerun
reads the `source` column of the committed parts and skips those rows; hidden leftovers are deleted.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import uuid
from typing import Any, Iterable, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq


JOB_FILE = "_job.json"
PART_PREFIX = "part-"


def filesystem(uri: str, endpoint_url: str | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec filesystem and bare path for a local path or an s3:// URI.

    S3 credentials come from the usual AWS environment variables (or instance roles); the endpoint
    from `endpoint_url` or AWS_ENDPOINT_URL, for S3-compatible stores.
    """
    if uri.startswith("s3://"):
        endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        opts: dict[str, Any] = {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}
        opts["config_kwargs"] = {"retries": {"max_attempts": 8, "mode": "adaptive"}}
        return fsspec.core.url_to_fs(uri, **opts)
    return fsspec.core.url_to_fs(os.path.abspath(os.path.expanduser(uri)))


def _uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return f"s3://{path}" if _is_s3(fs) else path


def _is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    return "s3" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,))


@contextlib.contextmanager
def _naming(fs: fsspec.AbstractFileSystem, path: str, action: str) -> Iterator[None]:
    """Storage errors left after the filesystem's own retries name the object: 'cannot write s3://b/k: ...'."""
    try:
        yield
    except OSError as e:
        cls = next(c for c in (PermissionError, FileNotFoundError, OSError) if isinstance(e, c))
        raise cls(f"cannot {action} {_uri(fs, path)}: {e}") from e


def make_output_dir(fs: fsspec.AbstractFileSystem, out_dir: str) -> None:
    """Create the output directory. On S3 the bucket must exist: creating one would hide a typo."""
    if _is_s3(fs):
        bucket = out_dir.split("/", 1)[0]
        if not fs.exists(bucket):
            raise FileNotFoundError(f"output bucket s3://{bucket} does not exist (or these credentials cannot "
                                    "see it); create it first or fix the output URI")
        return  # S3 has no directories
    fs.makedirs(out_dir, exist_ok=True)


def _visible(path: str) -> bool:
    return not posixpath.basename(path).startswith((".", "_"))


def list_inputs(uri: str, endpoint_url: str | None = None) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """Input Parquet files of a file, directory (recursively) or glob, sorted; hidden files skipped."""
    fs, path = filesystem(uri, endpoint_url)
    if any(c in path for c in "*?["):
        files = [p for p in fs.glob(path) if fs.isfile(p)]
    elif fs.isdir(path):
        files = [p for p in fs.find(path) if _visible(p) and p.endswith((".parquet", ".parq", ".pq"))]
    elif fs.exists(path):
        files = [path]
    else:
        raise FileNotFoundError(f"input {uri} does not exist")
    if not files:
        raise FileNotFoundError(f"no Parquet files (*.parquet) found under {uri}")
    return fs, sorted(files)


def part_name(sources: Iterable[str]) -> str:
    """Deterministic name for a batch: a retried write of the same batch replaces, never duplicates."""
    digest = hashlib.sha256("\n".join(sources).encode()).hexdigest()[:24]
    return f"{PART_PREFIX}{digest}.parquet"


def write_part(fs: fsspec.AbstractFileSystem, out_dir: str, table: pa.Table,
               metadata: dict[str, str]) -> str:
    """Write `table` atomically as a committed part: hidden temp name, then rename."""
    final = posixpath.join(out_dir, part_name(table.column("source").to_pylist()))
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **{
        k.encode(): v.encode() for k, v in metadata.items()}})
    rewrite_part(fs, final, table)
    return final


def rewrite_part(fs: fsspec.AbstractFileSystem, path: str, table: pa.Table) -> None:
    """Write `table` as the part at `path`, replacing any part there in one rename (readers see old or new)."""
    with _atomic(fs, path, "wb") as f:
        pq.write_table(table, f, compression="zstd")


@contextlib.contextmanager
def _atomic(fs: fsspec.AbstractFileSystem, path: str, mode: str) -> Iterator[Any]:
    """Write to a hidden `.tmp-*` name beside `path`, then rename: readers see the whole file or none, and
    `clean_temporaries` removes what an interrupted write left. Errors name `path`."""
    tmp = posixpath.join(posixpath.dirname(path), f".tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}")
    with _naming(fs, path, "write"):
        with fs.open(tmp, mode) as f:
            yield f
        fs.mv(tmp, path)


def committed_parts(fs: fsspec.AbstractFileSystem, out_dir: str) -> list[str]:
    fs.invalidate_cache(out_dir)  # s3fs caches listings; parts are written by other processes
    if not fs.exists(out_dir):
        return []
    return sorted(p for p in fs.ls(out_dir, detail=False)
                  if posixpath.basename(p).startswith(PART_PREFIX) and p.endswith(".parquet"))


def read_committed(fs: fsspec.AbstractFileSystem, out_dir: str, columns: list[str] | None) -> pa.Table:
    """The given columns of every committed part (empty table when none), e.g. the done `source`s."""
    tables = []
    for p in committed_parts(fs, out_dir):
        with fs.open(p, "rb") as f:
            tables.append(pq.read_table(f, columns=columns))
    if not tables:
        return pa.table({c: pa.array([], pa.string()) for c in columns or []})
    return pa.concat_tables(tables, promote_options="default")


def clean_temporaries(fs: fsspec.AbstractFileSystem, out_dir: str) -> int:
    """Delete leftovers of interrupted writes; they were never committed."""
    if not fs.exists(out_dir):
        return 0
    stale = [p for p in fs.ls(out_dir, detail=False) if posixpath.basename(p).startswith(".tmp-")]
    for p in stale:
        fs.rm(p)
    return len(stale)


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any] | None:
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        return json.load(f)


def write_json(fs: fsspec.AbstractFileSystem, path: str, data: dict[str, Any]) -> None:
    with _atomic(fs, path, "w") as f:
        json.dump(data, f, indent=2, default=str)


def read_table(uri: str, endpoint_url: str | None = None, columns: list[str] | None = None) -> pa.Table:
    """All committed parts of a scored output directory, or one Parquet file, as one table."""
    fs, path = filesystem(uri, endpoint_url)
    if not fs.isdir(path):
        with fs.open(path, "rb") as f:
            return pq.read_table(f, columns=columns)
    if not committed_parts(fs, path):
        raise FileNotFoundError(f"no scored parts (part-*.parquet) under {uri}")
    return read_committed(fs, path, columns)


def write_table(uri: str, table: pa.Table, endpoint_url: str | None = None) -> str:
    """Write one Parquet file (a path ending in .parquet) or data.parquet inside a directory."""
    fs, path = filesystem(uri, endpoint_url)
    if not path.endswith(".parquet"):
        fs.makedirs(path, exist_ok=True)
        path = posixpath.join(path, "data.parquet")
    else:
        parent = posixpath.dirname(path)
        if parent:
            fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as f:
        pq.write_table(table, f)
    return path
