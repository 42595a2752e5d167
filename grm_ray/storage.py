"""Where rows come from and where they go: local paths or s3:// URIs, and the exactly-once commit.

Output protocol: each scored batch is written to a hidden temporary name and then renamed to
`part-<hash of its rows>.parquet`, so a file under a `part-` name is always complete. Each part records
in its Parquet metadata which (file, row range)s it holds (plan.py reads those records to resume);
hidden leftovers of interrupted writes are deleted.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import posixpath
import uuid
from typing import Any, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq


log = logging.getLogger(__name__)

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


def uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return f"s3://{path}" if is_s3(fs) else path


def is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    return "s3" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,))


@contextlib.contextmanager
def naming(fs: fsspec.AbstractFileSystem, path: str, action: str) -> Iterator[None]:
    """Storage errors left after the filesystem's own retries name the object: 'cannot write s3://b/k: ...'."""
    try:
        yield
    except OSError as e:
        cls = next(c for c in (PermissionError, FileNotFoundError, OSError) if isinstance(e, c))
        raise cls(f"cannot {action} {uri(fs, path)}: {e}") from e


def make_output_dir(fs: fsspec.AbstractFileSystem, out_dir: str) -> None:
    """Create the output directory. On S3 the bucket must exist: creating one would hide a typo."""
    if is_s3(fs):
        bucket = out_dir.split("/", 1)[0]
        if not fs.exists(bucket):
            raise FileNotFoundError(f"output bucket s3://{bucket} does not exist (or these credentials cannot "
                                    "see it); create it first or fix the output URI")
        return  # S3 has no directories
    fs.makedirs(out_dir, exist_ok=True)


def _hidden(rel: str) -> bool:
    """Whether a path below the input root has a component starting with `_` or `.` (Spark's `_temporary/`,
    `_delta_log/`, `.staging`, `_SUCCESS`)."""
    return any(c.startswith((".", "_")) for c in rel.split("/"))


def _fixed_prefix(pattern: str) -> str:
    """The directory part of a glob before its first wildcard: 'b/prefs/dt=*/x.parquet' -> 'b/prefs'."""
    parts = pattern.split("/")
    fixed = next(i for i, c in enumerate(parts) if any(w in c for w in "*?["))
    return "/".join(parts[:fixed])


def _is_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def input_root(uri_: str, endpoint_url: str | None = None) -> str:
    """What an input URI's row keys are relative to, without listing: 'in', 'in/', './in' and the absolute
    path are one input, and so are 'd/dt=*' and 'd/dt=*/*.parquet' (both keyed under 'd'), and 'd/x.parquet'
    with 'd' (a single file's keys are relative to its directory)."""
    fs, path = filesystem(uri_, endpoint_url)
    path = posixpath.normpath(path.rstrip("/"))
    if _is_glob(path):
        path = _fixed_prefix(path)
    else:
        with _reaching(uri_):
            if fs.isfile(path):
                path = posixpath.dirname(path)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return f"{protocol}://{path}"


def input_exists(uri_: str, endpoint_url: str | None = None) -> bool:
    """The input path (a glob's fixed prefix) exists: one request, no listing."""
    fs, path = filesystem(uri_, endpoint_url)
    path = path.rstrip("/")
    with _reaching(uri_):
        return fs.exists(_fixed_prefix(path) if _is_glob(path) else path)


@contextlib.contextmanager
def _reaching(uri_: str) -> Iterator[None]:
    """Storage requests about the input: a store that cannot be reached at all (a wrong endpoint, no network,
    no credentials) is one OSError naming the input, not botocore's traceback (its errors are not OSErrors)."""
    try:
        yield
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - botocore's EndpointConnectionError and kin
        raise OSError(f"cannot reach input {uri_}: {type(e).__name__}: {e}") from e


def list_inputs(uri_: str, endpoint_url: str | None = None, exclude: str | None = None
                ) -> tuple[fsspec.AbstractFileSystem, str, list[dict[str, Any]]]:
    """Input files of a file, directory (recursively) or glob: (fs, root, file infos sorted by name, each
    file once however many glob matches reach it).

    `root` is what row keys are relative to: the directory given, a glob's fixed prefix, or a single file's
    directory. Below the root, paths with a hidden component (`_x`, `.x`) are skipped at every depth, and so
    is everything under `exclude` (a URI: the job's own output, when it lies inside its input). Every other
    file is listed whatever its name (Hive writes `000000_0`), except the empty "folder" objects some S3
    tools make; plan.scan_inputs skips a listed file that is not Parquet at all (info["listed"]) and reports
    one named explicitly. Infos come from the listing itself (size, ETag / mtime).
    """
    fs, path = filesystem(uri_, endpoint_url)
    path = path.rstrip("/")
    with _reaching(uri_):
        if _is_glob(path):  # a match is a file, or a directory read recursively
            root = _fixed_prefix(path)
            found = [f for i in fs.glob(path, detail=True).values()
                     for f in ([i] if i.get("type") != "directory" else fs.find(i["name"], detail=True).values())]
        elif fs.isdir(path):
            root = path
            found = list(fs.find(path, detail=True).values())
        elif fs.exists(path):
            return fs, posixpath.dirname(path), [fs.info(path)]
        else:
            raise FileNotFoundError(f"input {uri_} does not exist")
    found = _follow_links(fs, found, {os.path.realpath(root)})  # only a local listing holds links
    skip = None
    if exclude:
        other, skip = filesystem(exclude, endpoint_url)
        skip = skip.rstrip("/") + "/" if type(other) is type(fs) else None
    markers = _parents(found) if any(i.get("size") == 0 for i in found) else set()
    files = {i["name"]: {**i, "listed": True} for i in found if i.get("type") == "file"
             and not (i["name"].endswith("/") or i.get("size") == 0 and i["name"] + "/" in markers)
             and not _hidden(posixpath.relpath(i["name"], root))}
    if skip and any(name.startswith(skip) for name in files):
        files = {name: i for name, i in files.items() if not name.startswith(skip)}
        log.info("the output %s lies inside the input %s: its files are not read as input", exclude, uri_)
    if not files:
        raise FileNotFoundError(f"no input files found under {uri_} (names starting with '_' or '.' are skipped)")
    return fs, root, [files[name] for name in sorted(files)]


def _follow_links(fs: fsspec.AbstractFileSystem, found: list[dict[str, Any]], seen: set[str]
                  ) -> list[dict[str, Any]]:
    """Local symlinks, which fsspec lists as type 'other' without descending: a link to a file is that file
    (size and mtime of the target), a link to a directory is read like one, each real directory once."""
    out = []
    for info in found:
        name = info["name"]
        if not info.get("islink"):
            out.append(info)
        elif os.path.isdir(name) and os.path.realpath(name) not in seen:
            seen.add(os.path.realpath(name))
            out += _follow_links(fs, list(fs.find(name, detail=True).values()), seen)
        elif os.path.isfile(name):
            st = os.stat(name)
            out.append({**info, "type": "file", "size": st.st_size, "mtime": st.st_mtime})
        elif not os.path.exists(name):
            log.warning("input link %s points to %s, which does not exist: skipped", name, os.readlink(name))
    return out


def _parents(found: list[dict[str, Any]]) -> set[str]:
    """Every directory above a listed name, with a trailing slash (an empty object of such a name is an S3
    folder marker, not a file)."""
    return {name[: i + 1] for name in (f["name"] for f in found) for i, c in enumerate(name) if c == "/"}


def looks_parquet(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """A Parquet name, or Parquet's magic bytes first: a broken Parquet file is bad input, a README or a
    checksum file beside the data is not input at all."""
    if path.endswith((".parquet", ".parq", ".pq")):
        return True
    try:
        with fs.open(path, "rb") as fh:
            return fh.read(4) == b"PAR1"
    except OSError:
        return False


def fingerprint(info: dict[str, Any]) -> str:
    """'size:ETag' on S3, 'size:mtime' on a local disk: a rewritten file gets another one."""
    stamp = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
    return f"{info.get('size')}:{str(stamp).strip(chr(34))}"


def part_name(record: dict[bytes, bytes]) -> str:
    """Deterministic name for a part from its row record: a retried write of the same rows replaces, never
    duplicates."""
    digest = hashlib.sha256(b"\n".join(v for _, v in sorted(record.items()))).hexdigest()[:24]
    return f"{PART_PREFIX}{digest}.parquet"


def write_part(fs: fsspec.AbstractFileSystem, out_dir: str, table: pa.Table,
               metadata: dict[str, str], record: dict[bytes, bytes]) -> str:
    """Write `table` atomically as a committed part carrying its row `record`: hidden temp name, then rename."""
    final = posixpath.join(out_dir, part_name(record))
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **record, **{
        k.encode(): v.encode() for k, v in metadata.items()}})
    with _atomic(fs, final, "wb") as f:
        pq.write_table(table, f, compression="zstd")
    return final


@contextlib.contextmanager
def _atomic(fs: fsspec.AbstractFileSystem, path: str, mode: str) -> Iterator[Any]:
    """Write to a hidden `.tmp-*` name beside `path`, then rename: readers see the whole file or none, and
    `clean_temporaries` removes what an interrupted write left. Errors name `path`."""
    tmp = posixpath.join(posixpath.dirname(path), f".tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}")
    with naming(fs, path, "write"):
        with fs.open(tmp, mode) as f:
            yield f
        fs.mv(tmp, path)


def committed_parts(fs: fsspec.AbstractFileSystem, out_dir: str) -> list[str]:
    fs.invalidate_cache(out_dir)  # s3fs caches listings; parts are written by other processes
    if not fs.exists(out_dir):
        return []
    return sorted(p for p in fs.ls(out_dir, detail=False)
                  if posixpath.basename(p).startswith(PART_PREFIX) and p.endswith(".parquet"))


def read_parquet(f: Any, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file from an open (fsspec) file object, read in the calling thread.

    `pq.read_table` hands the Python file to Arrow's I/O and CPU thread pools; the last reference can then be
    dropped in a pool thread while the interpreter exits, which aborts the process (PyGILState_Ensure during
    finalisation: `grm-ray demo` exited 134 one run in three after printing its results).
    """
    return pq.ParquetFile(f).read(columns=columns, use_threads=False)


def read_committed(fs: fsspec.AbstractFileSystem, out_dir: str, columns: list[str] | None) -> pa.Table:
    """The given columns of every committed part (empty table when none), e.g. the done `source`s."""
    tables = []
    for p in committed_parts(fs, out_dir):
        with fs.open(p, "rb") as f:
            tables.append(read_parquet(f, columns=columns))
    if not tables:
        return pa.table({c: pa.array([], pa.string()) for c in columns or []})
    return pa.concat_tables(tables, promote_options="default")


def clean_temporaries(fs: fsspec.AbstractFileSystem, out_dir: str) -> int:
    """Delete leftovers of interrupted writes; they were never committed."""
    if not fs.exists(out_dir):
        return 0
    stale = [p for p in fs.ls(out_dir, detail=False) if posixpath.basename(p).startswith(".tmp-")]
    if stale:
        fs.rm(stale)  # one call: s3fs deletes in batches of 1000 keys
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
            return read_parquet(f, columns=columns)
    if not committed_parts(fs, path):
        raise FileNotFoundError(f"no scored parts (part-*.parquet) under {uri}")
    return read_committed(fs, path, columns)


def write_table(uri_: str, table: pa.Table, endpoint_url: str | None = None) -> str:
    """Write one Parquet file (a path ending in .parquet) or data.parquet inside a directory.

    An empty table is written as its schema with no row group: pyarrow writes one row group of 0 rows,
    from which `datasets` takes a batch size of 0 and fails (ArrowInvalid: BatchSize must be greater than 0).
    """
    fs, path = filesystem(uri_, endpoint_url)
    if not path.endswith(".parquet"):
        fs.makedirs(path, exist_ok=True)
        path = posixpath.join(path, "data.parquet")
    else:
        parent = posixpath.dirname(path)
        if parent:
            fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as f:
        if table.num_rows:
            pq.write_table(table, f)
        else:
            pq.ParquetWriter(f, table.schema).close()
    return uri(fs, path)
