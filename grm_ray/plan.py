"""What the driver knows about a job, per input file and per unit of rows, never per row.

    scan_inputs   list the input (hidden paths skipped), read every footer in parallel: rows, row groups,
                  format, schema, fingerprint (size + ETag or mtime) per file
    read_ledger   read every committed part's record in parallel: which (file, row range)s it holds and
                  the fingerprints of those files when they were scored
    make_units    the rows still to score, as (file, start, stop) units of at most cfg.unit_rows rows
    check_counts  the exactly-once check from per-file counts: every input row committed once
    Lease         one writer per output: `_lease.json` with owner and heartbeat, renewed while a job runs

A row's key is `<file key>#<row>`, the file key relative to the input URI the user gave (the directory, or
a glob's fixed prefix), so files that appear elsewhere never change the keys of the others.
"""
from __future__ import annotations

import concurrent.futures
import errno
import functools
import json
import logging
import math
import os
import posixpath
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, TypeVar

import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.parquet as pq

from . import storage
from .config import JobConfig
from .schema import ERROR, ID, OUTPUT_FIELDS, detect_format, id_text, required_columns

log = logging.getLogger(__name__)
THREADS = 32  # footers and part records are small reads: latency-bound, so many at once
OUR_COLUMNS = {f.name for f in OUTPUT_FIELDS}
INPUT_PREFIX = "input_"  # an input column named like an output column is kept under this prefix
RECORD_KEY = b"grm_ray.rows"  # Parquet key-value metadata of a part: {file key: [[start, stop], ...]}
FINGERPRINT_KEY = b"grm_ray.inputs"  # {file key: fingerprint} of the files a part holds rows of
LEASE_FILE = "_lease.json"
UNREADABLE = "unreadable"  # the holder id of a lease file that is not one (empty, cut short)
T = TypeVar("T")


class JobError(RuntimeError):
    """The job cannot start or cannot finish correctly; the message says why and what to do."""


class LeaseHeld(JobError):
    """Another job holds the output's lease: this one wrote nothing there, and must not."""


def parallel(fn: Callable[[T], Any], items: Iterable[T], threads: int = THREADS) -> list[Any]:
    """fn over items on a thread pool, results in order: footers of 10^5 files in minutes, not hours."""
    items = list(items)
    if len(items) <= 1:
        return [fn(i) for i in items]
    with concurrent.futures.ThreadPoolExecutor(min(threads, len(items))) as pool:
        return list(pool.map(fn, items))


# ---- inputs -----------------------------------------------------------------------------------------------

@dataclass
class InputFile:
    """One input Parquet file as the driver knows it (a few hundred bytes, whatever its row count)."""

    path: str                      # filesystem path (bucket/key on S3)
    key: str                       # relative to the input root: the file part of every row's key
    fingerprint: str               # "size:ETag" (S3) or "size:mtime" (local): changes when the file does
    rows: int = 0
    groups: tuple[int, ...] = ()   # rows per row group
    fmt: str | None = None
    error: str | None = None       # a file-level problem (format, missing columns): every row carries it
    renames: dict[str, str] = field(default_factory=dict)  # input column -> name it is kept under


@dataclass
class Inputs:
    files: list[InputFile]
    passthrough: pa.Schema                       # unified input columns (after renames), in every part
    bad_files: dict[str, str]                    # file key -> why it could not be read
    id_files: list[str] = field(default_factory=list)  # paths of files with an `id` column

    @property
    def total_rows(self) -> int:
        return sum(f.rows for f in self.files)


def scan_inputs(cfg: JobConfig) -> Inputs:
    """List cfg.input and read each file's footer (in parallel): rows, row groups, format, schema."""
    fs, root, infos = storage.list_inputs(cfg.input, cfg.s3_endpoint_url, exclude=cfg.output)

    def footer(info: dict[str, Any]) -> tuple[InputFile, pa.Schema | None, str | None]:
        f = InputFile(path=info["name"], key=posixpath.relpath(info["name"], root),
                      fingerprint=storage.fingerprint(info))
        try:
            with fs.open(f.path, "rb") as fh:
                meta = pq.ParquetFile(fh).metadata
                schema = meta.schema.to_arrow_schema()
        except Exception as e:  # noqa: BLE001 - any unreadable file is reported, the rest still run
            if info.get("listed") and not storage.looks_parquet(fs, f.path):
                return f, None, None  # a README or checksum beside the data is not input: skipped, said below
            return f, None, f"not a readable Parquet file: {type(e).__name__}: {e}"
        f.groups = tuple(meta.row_group(g).num_rows for g in range(meta.num_row_groups))
        f.rows = sum(f.groups)
        f.fmt, f.error = _format(cfg, schema.names, f.key)
        return f, schema, None

    found = parallel(footer, infos)
    skipped = [f.key for f, schema, why in found if schema is None and not why]
    if skipped:
        log.warning("%d file(s) under the input are not Parquet and are skipped: %s%s", len(skipped),
                    ", ".join(skipped[:5]), ", ..." if len(skipped) > 5 else "")
        found = [x for x in found if x[1] is not None or x[2]]
        if not found:  # a directory of CSV or JSON, say: a job of no rows would look like success
            raise FileNotFoundError(f"no Parquet files under {cfg.input}: {len(skipped)} file(s) there, none of "
                                    f"them Parquet (e.g. {skipped[0]})")
    both = [f.key for f, schema, why in found if not why and cfg.input_format == "auto" and f.fmt == "responses"
            and {"chosen", "rejected"} <= set(schema.names)]
    if both:  # auto-detection had to choose: say which way, and how to choose the other
        log.warning("%d file(s) have both `responses` and `chosen`/`rejected` columns (e.g. %s): read in the "
                    "`responses` format, chosen/rejected kept as input columns; pass --input-format dpo (or hh) to "
                    "score chosen against rejected instead", len(both), both[0])
    # renames are decided over every file's columns, so a column keeps one output name across the input
    names = set().union(*(schema.names for _, schema, why in found if not why))
    renames = {fmt: input_renames(names, fmt) for fmt in {f.fmt for f, _, why in found if not why}}
    files, bad, schemas, id_files = [], {}, {}, []
    for f, schema, why in found:
        if why:
            bad[f.key] = why
            continue
        f.renames = {k: v for k, v in renames[f.fmt].items() if k in schema.names}
        files.append(f)
        if ID in schema.names:
            id_files.append(f.path)
        kept = pa.schema([s.with_name(f.renames.get(s.name, s.name)) for s in schema
                          if s.name not in OUR_COLUMNS or s.name in f.renames]).remove_metadata()
        schemas.setdefault(kept, f.key)  # one per distinct schema: 10^5 files of one layout unify once
    return Inputs(files=files, passthrough=_unify(schemas), bad_files=bad, id_files=id_files)


def input_renames(names: Iterable[str], fmt: str | None) -> dict[str, str]:
    """Input columns named like an output column, and the name each is kept under: {'source': 'input_source'}.

    Columns the format reads into the same output column (`id`; `messages`, `responses`, `label` of the
    responses format) are that column already and are not repeated.
    """
    read_as_is = {ID} | ({"messages", "responses", "label"} if fmt == "responses" else set())
    names = set(names)
    out = {}
    for n in sorted(names & OUR_COLUMNS - read_as_is):
        new = INPUT_PREFIX + n
        while new in names or new in OUR_COLUMNS:
            new = INPUT_PREFIX + new
        out[n] = new
    return out


def _unify(schemas: dict[pa.Schema, str]) -> pa.Schema:
    unified = pa.schema([])
    for s, key in schemas.items():
        try:
            unified = pa.unify_schemas([unified, s], promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise JobError(f"input shard {key} has a column whose type conflicts with other shards ({e}); "
                           "make the shards' schemas agree or score them as separate jobs") from None
    return unified


def _format(cfg: JobConfig, names: list[str], key: str) -> tuple[str | None, str | None]:
    try:
        fmt = detect_format(names) if cfg.input_format == "auto" else cfg.input_format
    except ValueError as e:
        return None, f"file {key}: {e}"
    missing = [c for c in required_columns(fmt) if c not in names]
    if fmt == "responses" and not ({"prompt", "messages"} & set(names)):
        missing.append("prompt or messages")
    if missing:
        return fmt, f"file {key}: missing column(s) {missing} for input format {fmt!r}"
    return fmt, None


def duplicate_ids(cfg: JobConfig, inputs: Inputs) -> frozenset[str]:
    """Ids that occur more than once across the input: a distributed group-by over the `id` columns only
    (Ray Data), so the driver holds just the duplicates, never the id list."""
    if not inputs.id_files:
        return frozenset()
    import ray

    ds = ray.data.from_items([{"path": p} for p in inputs.id_files],
                             override_num_blocks=max(1, len(inputs.id_files)))
    ds = ds.map_batches(_read_ids, batch_size=1, batch_format="pyarrow", num_cpus=0.25,
                        fn_kwargs={"input_uri": cfg.input, "endpoint": cfg.s3_endpoint_url})
    from ray.data.aggregate import Count

    rows = sum(f.rows for f in inputs.files if f.path in set(inputs.id_files))
    # Ray Data's default of 200 hash partitions costs ~1.5 min on a small local run; ~1M ids each is plenty
    dups = ds.groupby(ID, num_partitions=max(1, min(200, rows // 1_000_000))).aggregate(Count(alias_name="n")).map_batches(_where, batch_format="pyarrow",
                                                                       fn_kwargs={"column": "n", "above": 1})
    return frozenset(r[ID].decode("utf-8", "replace") for r in dups.iter_rows())


def _where(batch: pa.Table, column: str, above: int | None = None, null: bool | None = None) -> pa.Table:
    """Ray Data filter on a column: value > above, or is-null == null."""
    col = batch.column(column)
    mask = pa.compute.greater(col, above) if above is not None else (
        pa.compute.is_null(col) if null else pa.compute.is_valid(col))
    return batch.filter(mask)


def _read_ids(batch: pa.Table, input_uri: str, endpoint: str | None) -> pa.Table:
    """One file's ids as bytes (an int id as its decimal text), nulls dropped."""
    fs, _ = storage.filesystem(input_uri, endpoint)
    path = batch.column("path")[0].as_py()
    with fs.open(path, "rb") as f:
        col = storage.read_parquet(f, columns=[ID]).column(ID)
    if pa.types.is_floating(col.type):  # pandas' ints once one is missing: 1.0 -> "1", NaN -> no id
        col = pa.array([id_text(v) for v in col.to_pylist()], pa.string())
    elif not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_binary(col.type)):
        col = col.cast(pa.string())
    col = col.cast(pa.binary()).drop_null()
    return pa.table({ID: col})


# ---- what is committed ------------------------------------------------------------------------------------

def ranges_of(rows: Iterable[int]) -> list[list[int]]:
    """Sorted row numbers -> half-open ranges: [0, 1, 2, 5] -> [[0, 3], [5, 6]]."""
    out: list[list[int]] = []
    for r in sorted(rows):
        if out and r == out[-1][1]:
            out[-1][1] = r + 1
        else:
            out.append([r, r + 1])
    return out


def part_record(sources: Iterable[str], fingerprints: dict[str, str]) -> dict[bytes, bytes]:
    """The metadata a part carries: its rows as ranges per file key, and those files' fingerprints."""
    rows: dict[str, list[int]] = {}
    for s in sources:
        key, _, row = s.rpartition("#")
        rows.setdefault(key, []).append(int(row))
    ranges = {k: ranges_of(v) for k, v in sorted(rows.items())}
    return {RECORD_KEY: json.dumps(ranges, separators=(",", ":")).encode(),
            FINGERPRINT_KEY: json.dumps({k: fingerprints.get(k) for k in ranges}, separators=(",", ":")).encode()}


@dataclass
class Ledger:
    """What the committed parts hold, per file key: merged row ranges, fingerprints and overlaps."""

    ranges: dict[str, list[list[int]]] = field(default_factory=dict)   # merged, sorted, disjoint
    fingerprints: dict[str, set[str]] = field(default_factory=dict)
    parts_of: dict[str, list[str]] = field(default_factory=dict)        # file key -> part paths
    duplicated: dict[str, int] = field(default_factory=dict)           # file key -> rows committed twice
    overlaps: list[tuple[str, str]] = field(default_factory=list)      # the first few pairs of parts sharing rows
    rows: int = 0
    parts: int = 0
    columns: set[tuple[str, ...]] = field(default_factory=set)        # distinct column lists of the parts

    def committed(self, key: str) -> int:
        return sum(b - a for a, b in self.ranges.get(key, []))


def read_ledger(fs: Any, out_dir: str) -> Ledger:
    """Every committed part's record (its footer only, read in parallel)."""
    parts = storage.committed_parts(fs, out_dir)

    def record(path: str) -> tuple[str, int, dict, dict, tuple[str, ...]]:
        try:
            with fs.open(path, "rb") as f:
                meta = pq.ParquetFile(f).metadata
            kv = meta.metadata or {}
            if RECORD_KEY not in kv:
                raise JobError(f"committed part {storage.uri(fs, path)} has no row record ({RECORD_KEY.decode()}):"
                               " it was not written by grm-ray (or by a version before row records); move it out "
                               "of the output, rescore into a new output, or pass --overwrite")
            return (path, meta.num_rows, json.loads(kv[RECORD_KEY]), json.loads(kv.get(FINGERPRINT_KEY, b"{}")),
                    tuple(meta.schema.to_arrow_schema().names))
        except (pa.ArrowException, ValueError) as e:  # ValueError: a record that is not JSON
            raise JobError(f"committed part {storage.uri(fs, path)} cannot be read ({e}): it is damaged (a write "
                           "cut short?); move it out of the output and rerun: its rows are scored again") from e

    led = Ledger(parts=len(parts))
    per_key: dict[str, list[list[int]]] = {}
    for path, n, ranges, prints, columns in parallel(record, parts):
        led.columns.add(columns)
        held = sum(b - a for rs in ranges.values() for a, b in rs)
        if held != n:
            raise JobError(f"committed part {storage.uri(fs, path)} holds {n} rows but records {held}; "
                           "it was not written by this job: remove it or use another output")
        led.rows += n
        for key, rs in ranges.items():
            per_key.setdefault(key, []).extend((a, b, path) for a, b in rs)
            led.parts_of.setdefault(key, []).append(path)
            if prints.get(key):
                led.fingerprints.setdefault(key, set()).add(prints[key])
    for key, rs in per_key.items():
        merged: list[list[int]] = []
        last = ""  # the part holding merged[-1]'s end
        for a, b, path in sorted(rs):
            if merged and a < merged[-1][1]:
                led.duplicated[key] = led.duplicated.get(key, 0) + min(b, merged[-1][1]) - a
                if len(led.overlaps) < 3 and (last, path) not in led.overlaps:
                    led.overlaps.append((last, path))
            if merged and a <= merged[-1][1]:
                if b > merged[-1][1]:
                    merged[-1][1], last = b, path
            else:
                merged.append([a, b])
                last = path
        led.ranges[key] = merged
    return led


def rewrite_parts(fs: Any, parts: Iterable[str], drop: Callable[[pa.Table], pa.Array]) -> int:
    """Rewrite committed parts without the rows where `drop(table)` is true (in parallel); returns rows dropped.

    Each part is deleted before its remainder is written under a new name: a crash in between loses the
    kept rows from the output, and the next run scores them again, where the other order would leave them
    committed twice.
    """
    def one(path: str) -> int:
        with fs.open(path, "rb") as f:
            table = storage.read_parquet(f)
        mask = drop(table)
        n = pa.compute.sum(mask).as_py() or 0
        if not n:
            return 0
        meta = dict(table.schema.metadata or {})
        prints = json.loads(meta.get(FINGERPRINT_KEY, b"{}"))
        kept = table.filter(pa.compute.invert(mask))
        fs.rm(path)
        if kept.num_rows:
            record = part_record(kept.column("source").to_pylist(), prints)
            storage.write_part(fs, posixpath.dirname(path), kept.replace_schema_metadata(meta), {}, record)
        return n

    return sum(parallel(one, parts, threads=4))  # whole parts in memory: a few at a time


def rows_of_files(keys: set[str]) -> Callable[[pa.Table], pa.Array]:
    """A `rewrite_parts` predicate: rows whose `source` belongs to one of the file keys."""
    def drop(table: pa.Table) -> pa.Array:
        files = [s.rpartition("#")[0] for s in table.column("source").to_pylist()]
        return pa.array([f in keys for f in files], pa.bool_())
    return drop


# ---- planning ---------------------------------------------------------------------------------------------

@dataclass
class Plan:
    inputs: Inputs
    units: list[dict[str, Any]]     # (file, start, stop) with work left, at most cfg.unit_rows rows (see make_plan)
    skipped_rows: int               # already committed by an earlier run
    rescore: list[str]              # keys of changed files whose committed rows are to be dropped first
    orphans: dict[str, int]         # committed rows of files the input no longer lists
    unit_rows: int                  # the rows of a unit: cfg.unit_rows, or more past cfg.max_units

    @property
    def total_rows(self) -> int:
        return self.inputs.total_rows

    @property
    def bad_files(self) -> dict[str, str]:
        return self.inputs.bad_files


def changed_files(inputs: Inputs, led: Ledger) -> list[InputFile]:
    """Committed files whose fingerprint differs from the one recorded when their rows were scored."""
    return [f for f in inputs.files if f.key in led.fingerprints and led.fingerprints[f.key] != {f.fingerprint}]


def orphans(inputs: Inputs, led: Ledger) -> dict[str, int]:
    """Committed rows the current input does not contain: {file key: rows} (a file deleted, renamed or outside
    this input)."""
    rows = {f.key: f.rows for f in inputs.files}
    out = {}
    for key, rs in led.ranges.items():
        if key in inputs.bad_files:
            continue
        extra = sum(b - a for a, b in rs) if key not in rows else sum(max(0, b - max(a, rows[key])) for a, b in rs)
        if extra:
            out[key] = extra
    return out


def make_plan(cfg: JobConfig, inputs: Inputs, led: Ledger) -> Plan:
    """Units of work: each file's rows minus its committed ranges, cut into at most cfg.unit_rows rows (more
    when the rows to score exceed cfg.max_units x cfg.unit_rows)."""
    changed = changed_files(inputs, led)
    if changed and not cfg.rescore_changed:
        names = ", ".join(f.key for f in changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
        raise JobError(f"input file(s) changed since their rows were scored: {names} (size, ETag or mtime differ); "
                       "pass --rescore-changed to drop their old labels and score them again, or restore the files")
    rescore = {f.key for f in changed}
    spans, skipped = [], 0
    for f in inputs.files:
        done = [] if f.key in rescore else led.ranges.get(f.key, [])
        skipped += sum(min(b, f.rows) - a for a, b in done if a < f.rows)
        spans += [(f, group, start, stop) for group, start, stop in _within_groups(_gaps(done, f.rows), f.groups)]
    # a bounded number of units: each is a Ray Data block, with driver state of its own for the whole run
    size = max(cfg.unit_rows, math.ceil(sum(b - a for _, _, a, b in spans) / cfg.max_units))
    units = [{"path": f.path, "key": f.key, "start": a, "stop": min(stop, a + size), "group": group,
              "fmt": f.fmt, "file_error": f.error, "renames": f.renames}
             for f, group, start, stop in spans for a in range(start, stop, size)]
    return Plan(inputs=inputs, units=units, skipped_rows=skipped, rescore=sorted(rescore),
                orphans=orphans(inputs, led), unit_rows=size)


def read_runs(units: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive units of one row group merged into one read: Parquet cannot start a read inside a row group,
    so a unit of a million-row group read alone fetched the whole group and decoded it up to the unit's start,
    once per unit (quadratic; on S3 the whole group downloaded per unit). The read task decodes the group
    once and pipeline.build cuts its output back into blocks of a unit's rows."""
    runs: list[dict[str, Any]] = []
    for u in units:
        last = runs[-1] if runs else None
        if last and (last["path"], last["group"], last["stop"]) == (u["path"], u["group"], u["start"]):
            last["stop"] = u["stop"]
        else:
            runs.append(dict(u))
    return runs


def _within_groups(spans: list[tuple[int, int]], groups: tuple[int, ...]) -> list[tuple[tuple[int, int], int, int]]:
    """Cut row spans at row-group boundaries into ((group index, its first row), start, stop): a unit never
    spans two groups, so small groups stay one unit each (a block, a task, a commit of their own downstream),
    only big groups are split, and a unit names its one group instead of carrying the file's group list."""
    out, first, i = [], 0, 0
    for g, n in enumerate(groups):  # spans are sorted and disjoint: one pass over both
        while i < len(spans) and spans[i][1] <= first:
            i += 1
        j = i
        while j < len(spans) and spans[j][0] < first + n:
            out.append(((g, first), max(spans[j][0], first), min(spans[j][1], first + n)))
            j += 1
        first += n
    return out


def _gaps(done: list[list[int]], n: int) -> list[tuple[int, int]]:
    """[0, n) minus the sorted disjoint ranges `done`."""
    out, at = [], 0
    for a, b in done:
        if a > at:
            out.append((at, min(a, n)))
        at = max(at, b)
    if at < n:
        out.append((at, n))
    return [(a, b) for a, b in out if a < b]


def check_counts(inputs: Inputs, led: Ledger) -> None:
    """Exactly once, from counts: each readable file's rows all committed, none twice."""
    missing = {f.key: f.rows - led.committed(f.key) for f in inputs.files
               if led.ranges.get(f.key, []) != ([[0, f.rows]] if f.rows else [])}
    missing = {k: v for k, v in missing.items() if v > 0}
    show = lambda d: ", ".join(f"{k}: {v}" for k, v in sorted(d.items())[:3])  # noqa: E731
    if led.duplicated:  # not for a rerun to mend: a part copied or restored by hand, or another writer
        pairs = "; ".join(f"{posixpath.basename(a)} and {posixpath.basename(b)}" for a, b in led.overlaps)
        raise JobError(f"output check failed: {sum(led.duplicated.values())} row(s) committed twice "
                       f"({show(led.duplicated)}); parts holding the same rows: {pairs}. A copied or restored part? "
                       "Delete one of each pair, then run `grm-ray verify` on the output")
    if missing:
        raise JobError(f"output check failed: {sum(missing.values())} input row(s) missing ({show(missing)}); "
                       "rerun the same command to resume, or run `grm-ray verify` for a row-level audit")


# Options that change results: resuming with a different value would mix two jobs in one output.
RESULT_KEYS = ("input", "input_format", "max_responses", "model", "k", "temperature", "top_p", "max_tokens",
               "seed", "structured", "adaptive", "risk", "hint", "chat_fallback", "meta_mode", "meta_model",
               "k_meta")


def check_previous_job(cfg: JobConfig, fs: Any, out_dir: str) -> None:
    """Refuse to mix two jobs' results in one output; start afresh with --overwrite (under the lease)."""
    job_path = posixpath.join(out_dir, storage.JOB_FILE)
    if cfg.overwrite:
        doomed = storage.committed_parts(fs, out_dir) + ([job_path] if fs.exists(job_path) else [])
        if doomed:
            fs.rm(doomed)  # one call: s3fs deletes in batches of 1000 keys
    previous = storage.read_json(fs, job_path)
    if previous:
        now = cfg.public()

        def same(k: str, before: Any) -> bool:  # an input is compared by its key root, not its spelling
            if k == "input" and isinstance(before, str):
                root = functools.partial(storage.input_root, endpoint_url=cfg.s3_endpoint_url)
                return root(before) == root(cfg.input)
            return now.get(k) == before

        changed = {k: (v, now.get(k)) for k, v in previous["config"].items() if k in RESULT_KEYS and not same(k, v)}
        if changed and not storage.committed_parts(fs, out_dir):  # a run that stopped before committing anything
            log.info("output %s: the earlier job there committed no rows; this one takes its place", cfg.output)
        elif changed:
            diff = ", ".join(f"{k}: {a!r} before, {b!r} now" for k, (a, b) in changed.items())
            raise JobError(f"output {cfg.output} holds results of a different job ({diff}); "
                           "rerun with the same options to resume, or pass --overwrite to start afresh")
    elif storage.committed_parts(fs, out_dir):
        raise JobError(f"output {cfg.output} holds part files but no {storage.JOB_FILE}; "
                       "use another output or --overwrite")
    cleaned = storage.clean_temporaries(fs, out_dir)
    if cleaned:
        log.info("removed %d unfinished temporary file(s) from an interrupted run", cleaned)



def error_rows(fs: Any, out_dir: str) -> int:
    """Rows with an error across committed parts, from each part's column statistics (footers only)."""
    def nulls(path: str) -> int:
        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
        # the Parquet leaf column of `error` (nested columns before it have several leaves each)
        i = next(j for j in range(meta.num_columns) if meta.schema.column(j).path == ERROR)
        errs = 0
        for g in range(meta.num_row_groups):
            col = meta.row_group(g).column(i)
            stats = col.statistics
            if stats is None or not stats.has_null_count:
                with fs.open(path, "rb") as f:
                    return storage.read_parquet(f, columns=[ERROR]).column(ERROR).count()
            errs += meta.row_group(g).num_rows - stats.null_count
        return errs

    return sum(parallel(nulls, storage.committed_parts(fs, out_dir)))


# ---- one writer -------------------------------------------------------------------------------------------

class Lease:
    """`_lease.json` in the output: owner, start, heartbeat, expiry. One job writes an output at a time.

    A second job refuses at once, naming the holder. A lease whose heartbeat is older than its expiry, or
    whose holder was a process on this host that no longer runs (a killed driver), is taken over with a
    log line. On S3 every write is conditional (If-None-Match / If-Match on the ETag), so two jobs racing
    for the lease cannot both win; on a local disk an exclusive lock file serialises the same steps.
    """

    def __init__(self, fs: Any, out_dir: str, expiry: float):
        self.fs, self.path, self.expiry = fs, posixpath.join(out_dir, LEASE_FILE), expiry
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "id": uuid.uuid4().hex[:12],
                      "started": time.time()}
        self.lost: str | None = None  # set by the heartbeat when another job took the lease
        self._etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def describe(self, holder: dict[str, Any]) -> str:
        if holder.get("id") == UNREADABLE:
            return "an unreadable lease file (empty, or not a lease)"
        age = time.time() - holder.get("heartbeat", 0)
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder.get("started", 0)))
        return (f"{holder.get('host')} pid {holder.get('pid')} (lease {holder.get('id')}, started {started}, "
                f"last heartbeat {age:.0f}s ago)")

    def acquire(self) -> None:
        with self._locked():
            holder, etag = self._read()
            if holder and holder.get("id") != self.owner["id"]:
                why = self._stale(holder)
                if not why:
                    expiry = holder.get("expiry", self.expiry)
                    left = max(0.0, expiry - (time.time() - holder.get("heartbeat", 0)))
                    raise LeaseHeld(f"output {storage.uri(self.fs, posixpath.dirname(self.path))} is being written "
                                    f"by another job: {self.describe(holder)}; wait for it to finish, or if it is "
                                    f"dead, rerun after its lease expires ({expiry:.0f}s without a heartbeat: "
                                    f"{left:.0f}s from now at the earliest)")
                log.warning("taking over the output lease of %s: %s", self.describe(holder), why)
            self._write(etag, create=holder is None)
        self._thread = threading.Thread(target=self._beat, name="grm-ray-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours; never raises (it runs in a `finally`
        whose own error matters more), an undeleted lease just expires."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)
        try:
            with self._locked():
                holder, _ = self._read()
                if holder and holder.get("id") == self.owner["id"]:
                    self.fs.rm(self.path)
        except Exception as e:  # noqa: BLE001
            log.warning("could not release the output lease %s (it expires after %.0fs): %s",
                        storage.uri(self.fs, self.path), self.expiry, e)

    def _stale(self, holder: dict[str, Any]) -> str | None:
        if holder.get("id") == UNREADABLE:
            return "nothing in it names a live job"
        age = time.time() - holder.get("heartbeat", 0)
        if age > holder.get("expiry", self.expiry):
            return f"no heartbeat for {age:.0f}s (expiry {holder.get('expiry', self.expiry):.0f}s)"
        if holder.get("host") == self.owner["host"] and not _alive(holder.get("pid"), holder.get("started")):
            return "its process no longer runs on this host"
        return None

    def _beat(self) -> None:
        while not self._stop.wait(max(1.0, self.expiry / 6)):
            try:
                with self._locked():
                    holder, etag = self._read()
                    if not holder or holder.get("id") != self.owner["id"]:
                        self.lost = (f"the output lease was taken over by {self.describe(holder)}" if holder
                                     else "the output lease was deleted")
                        log.error("%s; this job stops writing", self.lost)
                        return
                    self._write(etag, create=False)
            except Exception as e:  # noqa: BLE001 - a failed renewal is retried at the next beat
                log.warning("output lease renewal failed (retrying): %s", e)

    def _read(self) -> tuple[dict[str, Any] | None, str | None]:
        """The holder and the lease object's ETag (S3). A lease file that is not one (empty, cut short) reads as
        an unreadable holder, with its ETag, so that it can be taken over like a dead one."""
        self.fs.invalidate_cache(self.path)
        try:
            etag = self.fs.info(self.path).get("ETag") if storage.is_s3(self.fs) else None
            raw = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None, None
        try:
            holder = json.loads(raw)
            if isinstance(holder, dict) and isinstance(holder.get("heartbeat", 0), (int, float)):
                return holder, etag
        except ValueError:
            pass
        return {"heartbeat": 0, "host": "?", "pid": None, "id": UNREADABLE}, etag

    def _write(self, etag: str | None, create: bool) -> None:
        data = json.dumps({**self.owner, "heartbeat": time.time(), "expiry": self.expiry}).encode()
        if storage.is_s3(self.fs):
            try:
                self.fs.pipe_file(self.path, data, **({"mode": "create"} if create else {"IfMatch": etag}))
            except OSError as e:
                if not (isinstance(e, FileExistsError) or e.errno == errno.EINVAL):  # not a failed precondition
                    with storage.naming(self.fs, self.path, "write"):
                        raise
                holder, _ = self._read()  # another job wrote first ...
                if holder and holder.get("id") == self.owner["id"]:
                    return  # ... unless a retried request had already written ours (a dropped response)
                raise LeaseHeld(f"another job took the output lease first: "
                                f"{self.describe(holder) if holder else e}") from None
        else:
            with storage.naming(self.fs, self.path, "write"):
                tmp = f"{self.path}.tmp-{self.owner['id']}"
                self.fs.pipe_file(tmp, data)
                self.fs.mv(tmp, self.path)

    def _locked(self):
        """An exclusive lock around read-check-write on a local disk; S3 relies on conditional writes."""
        import contextlib

        if storage.is_s3(self.fs):
            return contextlib.nullcontext()
        import fcntl

        @contextlib.contextmanager
        def lock():
            with open(self.path + ".lock", "a") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(fh, fcntl.LOCK_UN)
        return lock()


def _alive(pid: int | None, started: float | None) -> bool:
    """Whether a process of this host with that pid and start time still runs (pids get reused)."""
    if not pid:
        return False
    try:
        import psutil

        p = psutil.Process(pid)
        return started is None or p.create_time() <= started + 1
    except ImportError:
        try:
            os.kill(pid, 0)
            return True
        except PermissionError:  # it runs, as another user
            return True
        except OSError:
            return False
    except Exception:  # noqa: BLE001 - psutil.NoSuchProcess and friends
        return False


# ---- row-level audit --------------------------------------------------------------------------------------

def audit(cfg: JobConfig, start_ray: Callable[[], Any] = lambda: None) -> dict[str, Any]:
    """`grm-ray verify`: every committed row's `source`, read in parallel by Ray Data tasks and grouped there,
    against each part's own record and (with cfg.input) the input's row counts. The driver gets per-file
    aggregates and a few examples, never the rows. `start_ray` is called once the paths are known good."""
    import ray
    from ray.data.aggregate import Count, Sum

    fs, out_dir = storage.filesystem(cfg.output, cfg.s3_endpoint_url)
    if not fs.exists(out_dir):  # a typo must not pass the audit as an empty output
        raise FileNotFoundError(f"output {cfg.output} does not exist")
    parts = storage.committed_parts(fs, out_dir)
    if not parts and not fs.exists(posixpath.join(out_dir, storage.JOB_FILE)):
        raise JobError(f"{cfg.output} is not a grm-ray output: no {storage.JOB_FILE} and no committed parts")
    inputs = scan_inputs(cfg) if cfg.input else None
    sizes = {f.key: f.rows for f in inputs.files} if inputs else {}
    start_ray()
    report: dict[str, Any] = {"output": storage.uri(fs, out_dir), "parts": len(parts), "rows": 0,
                              "duplicated_rows": 0, "missing_rows": 0, "orphaned_rows": 0,
                              "record_mismatches": [], "examples": []}
    per_file: dict[str, dict[str, Any]] = {}
    if parts:
        rows = ray.data.from_items([{"path": p} for p in parts], override_num_blocks=len(parts)).map_batches(
            _part_sources, batch_size=1, batch_format="pyarrow", num_cpus=0.25,
            fn_kwargs={"output": cfg.output, "endpoint": cfg.s3_endpoint_url}).materialize()
        report["record_mismatches"] = [r["mismatch"] for r in rows.map_batches(
            _where, batch_format="pyarrow", fn_kwargs={"column": "mismatch", "null": False}).take(20)]
        distinct = rows.map_batches(_where, batch_format="pyarrow", fn_kwargs={"column": "mismatch", "null": True})
        distinct = distinct.groupby(["key", "row"]).aggregate(Count(alias_name="n")).map_batches(
            _flag_beyond, batch_format="pyarrow", fn_kwargs={"sizes": sizes if inputs else None}).materialize()
        report["examples"] += [f"{r['key']}#{r['row']} committed {r['n']} times" for r in distinct.map_batches(
            _where, batch_format="pyarrow", fn_kwargs={"column": "n", "above": 1}).take(5)]
        per_file = {r["key"]: r for r in distinct.groupby("key").aggregate(
            Count(alias_name="distinct"), Sum("n", alias_name="total"),
            Sum("beyond", alias_name="beyond")).iter_rows()}
    for key, r in sorted(per_file.items()):
        report["rows"] += r["total"]
        report["duplicated_rows"] += r["total"] - r["distinct"]
        if inputs and key not in sizes and key not in inputs.bad_files:
            report["orphaned_rows"] += r["distinct"]
            report["examples"].append(f"{key}: {r['distinct']} committed rows but no such input file")
        elif inputs and r["beyond"]:
            report["orphaned_rows"] += r["beyond"]
            report["examples"].append(f"{key}: {r['beyond']} committed rows past the file's {sizes[key]} rows")
    for key, n in sizes.items():
        got = per_file.get(key, {"distinct": 0, "beyond": 0})
        missing = n - (got["distinct"] - got["beyond"])
        if missing:
            report["missing_rows"] += missing
            report["examples"].append(f"{key}: {missing} of {n} rows not committed")
    report["files"] = len(per_file)
    if inputs:
        changed = [f.key for f in changed_files(inputs, read_ledger(fs, out_dir))]  # footers only, in parallel
        report.update(input_rows=sum(sizes.values()), input_files=len(sizes), bad_files=inputs.bad_files,
                      changed_files=changed)
        for key, why in sorted(inputs.bad_files.items())[:5]:  # its rows cannot be in the output: not ok
            report["examples"].append(f"{key}: input file unreadable ({why})")
        for key in changed[:5]:  # its labels are those of an older version of the file: not ok
            report["examples"].append(f"{key}: rewritten since its rows were scored (rerun with --rescore-changed)")
    report["ok"] = not (report["duplicated_rows"] or report["missing_rows"] or report["orphaned_rows"]
                        or report["record_mismatches"] or report.get("bad_files") or report.get("changed_files"))
    return report


def _part_sources(batch: pa.Table, output: str, endpoint: str | None) -> pa.Table:
    """One part -> its rows' (key, row); a part whose record disagrees with its rows adds a `mismatch` row."""
    fs, _ = storage.filesystem(output, endpoint)
    path = batch.column("path")[0].as_py()
    with fs.open(path, "rb") as f:
        table = storage.read_parquet(f, columns=["source"])
    sources = table.column("source").to_pylist()
    keys, rows = zip(*((k, int(r)) for k, _, r in (s.rpartition("#") for s in sources))) if sources else ((), ())
    recorded = json.loads((table.schema.metadata or {}).get(RECORD_KEY, b"null"))
    actual = json.loads(part_record(sources, {})[RECORD_KEY])
    out = pa.table({"key": pa.array(keys, pa.string()), "row": pa.array(rows, pa.int64()),
                    "mismatch": pa.nulls(len(sources), pa.string())})
    if recorded != actual:
        why = f"{storage.uri(fs, path)}: its record {'is missing' if recorded is None else 'differs from its rows'}"
        out = pa.concat_tables([out, pa.table({"key": [None], "row": pa.array([None], pa.int64()),
                                               "mismatch": [why]}, schema=out.schema)])
    return out


def _flag_beyond(batch: pa.Table, sizes: dict[str, int] | None) -> pa.Table:
    """Mark distinct rows past their input file's end (0 when the input is not given)."""
    keys, rows = batch.column("key").to_pylist(), batch.column("row").to_pylist()
    beyond = [int(sizes is not None and k in sizes and r >= sizes[k]) for k, r in zip(keys, rows)]
    return batch.append_column("beyond", pa.array(beyond, pa.int64()))
