"""Ray-free batch stages: Normalize, GRMSampler, MetaScorer, Vote.

Each stage declares the columns it needs and the ones it adds; `apply` runs a stage on an Arrow table,
checks one output per input and keeps every other column as it was. Rows that already carry an
`error` pass through untouched, so a bad row is never dropped.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import math
from typing import Any, Sequence

import pyarrow as pa

from . import prompts, voting
from .config import JobConfig
from .engines import RequestFailed, gather_all
from .parsing import parse_scores
from .reuse import content_key, options_digest
from .schema import (CONTENT_KEY, ERROR, ID, LABEL, MESSAGES, NORMALIZED, RESPONSES, SAMPLED, SAMPLES,
                     SOURCE, VOTED, RowError, as_given, id_text, normalize)

log = logging.getLogger(__name__)
Row = dict[str, Any]


def apply(stage: Any, table: pa.Table) -> pa.Table:
    """Run `stage` on a table: rows of its `needs` in, rows of its `adds` out, same order and count."""
    return _columns(stage, table, stage(_needed_rows(stage, table)))


async def aapply(stage: Any, table: pa.Table) -> pa.Table:
    """`apply` for a stage with an async `acall` (the engine stages): the caller's loop keeps other batches going."""
    return _columns(stage, table, await stage.acall(_needed_rows(stage, table)))


def _needed_rows(stage: Any, table: pa.Table) -> list[Row]:
    missing = [c for c in stage.needs if c not in table.column_names]
    if missing:
        raise KeyError(f"{type(stage).__name__} needs columns {missing}; the batch has {table.column_names}")
    return table.select(list(stage.needs)).to_pylist()


def _columns(stage: Any, table: pa.Table, out: list[Row]) -> pa.Table:
    """The stage's `adds` columns from its output rows, set on (or appended to) the input table."""
    if len(out) != table.num_rows:
        raise RuntimeError(f"{type(stage).__name__} returned {len(out)} rows for {table.num_rows}")
    for field in stage.adds:
        column = pa.array([r[field.name] for r in out], type=field.type)
        if field.name in table.column_names:
            table = table.set_column(table.column_names.index(field.name), field, column)
        else:
            table = table.append_column(field, column)
    return table


def item_seed(seed: int, item_id: str) -> int:
    """A per-item seed independent of batching: the same item and seed always draw the same way."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{item_id}".encode()).digest()[:4], "little")


class Normalize:
    """Raw input rows of one file -> the internal row shape, plus the input's own columns.

    Call with the rows of one file starting at `first_row`; every row comes out, bad ones with an
    `error` naming file, row and field.
    """

    adds = NORMALIZED

    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        self.digest = options_digest(cfg.public())

    def __call__(self, table: pa.Table, file: str, rows: Sequence[int], fmt: str | None,
                 duplicate_ids: frozenset[str] = frozenset(), file_error: str | None = None) -> pa.Table:
        out = []
        for raw, row in zip(_rows(table), rows):
            source = f"{file}#{row}"
            given_id = id_text(raw.get(ID)) if isinstance(raw, dict) else None
            item: Row = {ID: source if given_id is None else given_id, SOURCE: source,
                         MESSAGES: None, RESPONSES: None, LABEL: None, ERROR: None, CONTENT_KEY: None}
            try:
                if file_error:
                    raise RowError(file_error)
                if isinstance(raw, RowError):
                    raise raw
                if given_id is not None and given_id in duplicate_ids:
                    raise RowError(f"field 'id': duplicate id {given_id!r} (ids must be unique)")
                item.update(normalize(raw, fmt, self.cfg.max_responses))
                item[CONTENT_KEY] = content_key(item, self.digest)
            except RowError as e:
                item[ERROR] = f"{file}, row {row}: {e}"
                item.update(as_given(raw, fmt))
            out.append(item)
        keep = _valid_utf8(table.drop_columns([c for c in NORMALIZED.names if c in table.column_names]))
        normalized = pa.Table.from_pylist(out, schema=NORMALIZED)
        for field in NORMALIZED:
            keep = keep.append_column(field, normalized.column(field.name))
        return keep


def _rows(table: pa.Table) -> list[Row | RowError]:
    """Rows as dicts; a row holding a string that is not valid UTF-8 (some writers produce them) becomes a
    RowError naming the field, instead of failing the whole batch."""
    try:
        return table.to_pylist()
    except UnicodeDecodeError:
        pass
    out: list[Row | RowError] = []
    for i in range(table.num_rows):
        row: Row | RowError = {}
        for name in table.column_names:
            try:
                row[name] = table.column(name)[i].as_py()
            except UnicodeDecodeError as e:
                row = RowError(f"field '{name}' is not valid UTF-8 ({e.reason} at byte {e.start})")
                break
        out.append(row)
    return out


def _valid_utf8(table: pa.Table) -> pa.Table:
    """Input columns passed through to the output, with string / list<string> values made valid UTF-8
    (invalid bytes -> U+FFFD; `_rows` has flagged those rows), so the scored Parquet stays readable."""
    for i, field in enumerate(table.schema):
        t = field.type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t)
                or (pa.types.is_list(t) and pa.types.is_string(t.value_type))):
            continue
        try:
            table.column(i).validate(full=True)
            continue
        except pa.ArrowInvalid:
            pass
        raw = table.column(i).cast(pa.list_(pa.binary()) if pa.types.is_list(t) else pa.binary()).to_pylist()
        fix = lambda b: None if b is None else b.decode("utf-8", "replace")  # noqa: E731
        fixed = [None if v is None else [fix(b) for b in v] if isinstance(v, list) else fix(v) for v in raw]
        table = table.set_column(i, field, pa.array(fixed, t))
    return table


class GRMSampler:
    """Draw k GRM samples per item over balanced response orders; parse and un-shuffle their scores.

    Adaptive modes draw a first round of the fewest samples at which their rule could stop, then one
    balanced round at a time, and stop an item once the rule says more samples cannot (exact) or are
    unlikely to (confident) change its plain-vote winner.
    """

    needs = (ID, MESSAGES, RESPONSES, LABEL, ERROR)
    adds = SAMPLED

    def __init__(self, cfg: JobConfig, engine: Any = None):
        self.cfg = cfg
        if engine is None:
            from .engines import grm_engine
            engine = grm_engine(cfg)
        self.engine = engine

    def __call__(self, rows: list[Row]) -> list[Row]:
        """Blocking `acall` (tests, scripts, serve's worker thread)."""
        return asyncio.run(self.acall(rows))

    async def acall(self, rows: list[Row]) -> list[Row]:
        """One output per row, in order; every item runs on its own, so the engine never waits on a batch."""
        out: list[Row] = [{SAMPLES: None, ERROR: r[ERROR]} for r in rows]
        await gather_all(self._item(r, o) for r, o in zip(rows, out) if r[ERROR] is None)
        return out

    async def _item(self, row: Row, out: Row) -> None:
        """All rounds of one item: each round's requests (one per ordering) go out together, its repairs as
        soon as its samples are back, the next round as soon as the adaptive rule asks for it."""
        cfg, n = self.cfg, len(row[RESPONSES])
        out[SAMPLES] = []
        size = self._round_size(n)
        rounds = math.ceil(cfg.k / size)
        first = self._first_round(n, size, rounds)
        drawn = 0
        while True:
            count = self._next_round(out, drawn, size) if drawn else min(first, cfg.k)
            orders = prompts.orderings(n, count, seed=item_seed(cfg.seed, row[ID]), start=drawn)
            ids = self.engine.encode([self._prompt(row, order) for order, _ in orders])  # tokenised once
            if self._too_long(ids, out):
                return
            # seeded per item, round and order: a rerun repeats, and adaptive rounds draw afresh
            seeds = [item_seed(cfg.seed, f"{row[ID]}/{drawn}/{order}") for order, _ in orders]
            try:
                gens = await self.engine.asample(ids, [c for _, c in orders], [n] * len(orders), seeds=seeds)
                await self._record(row, orders, ids, gens, out)
            except RequestFailed as e:  # a server engine gave up on this item: its row says why, the rest go on
                out.update({SAMPLES: None, ERROR: str(e)})
                return
            drawn += count
            if self._done(out, drawn, rounds):
                return

    def _round_size(self, n: int) -> int:
        if self.cfg.adaptive == "off" or n < 2:
            return self.cfg.k
        return min(self.cfg.k, n)

    def _next_round(self, item: Row, drawn: int, size: int) -> int:
        """Samples in an item's next round. Exact: the fewest whole rounds after which the lead could pass
        9 x the samples still to come, even if every new sample were as lopsided as possible, so the rule
        is asked only where it could stop. The decisions are the ones of rounds of `size`, in fewer, larger
        calls: an item's rounds run one after another, and each one waits for its slowest sample."""
        remaining = self.cfg.k - drawn
        if self.cfg.adaptive != "exact":
            return min(size, remaining)
        valid = [s["scores"] for s in item[SAMPLES] if s["valid"]]
        lead = voting.lead([sum(col) for col in zip(*valid)]) if valid else 0
        fewest = int((voting.MAX_SWING * remaining - lead) // (2 * voting.MAX_SWING)) + 1  # lead + 9m > 9(rem - m)
        return min(remaining, max(size, -(-fewest // size) * size))

    def _first_round(self, n: int, size: int, rounds: int) -> int:
        """Samples in an item's first round: the fewest (whole rounds) at which the rule could stop at all,
        even if every sample were as lopsided as possible. Exact needs more than k/2; drawing those in one
        call instead of k/(2n) small ones changes no decision and keeps the engine's batches large."""
        for m in range(size, self.cfg.k, size):
            if self._decided([[10] + [1] * (n - 1)] * m, self.cfg.k - m, rounds):
                return m
        return self.cfg.k

    def _hinted(self, row: Row) -> bool:
        return self.cfg.hint and row[LABEL] is not None and len(row[RESPONSES]) > 1

    def _prompt(self, row: Row, order: list[int]) -> str:
        hint = order.index(row[LABEL]) if self._hinted(row) else None
        text = prompts.render_grm_prompt(row[MESSAGES], [row[RESPONSES][j] for j in order], hint=hint)
        return self.engine.render(text)

    def _too_long(self, ids: list[list[int]], out: Row) -> bool:
        """A row whose prompt would not fit the context gets an error instead of sinking the batch."""
        limit = self.engine.max_prompt_tokens
        n_tok = max(len(p) for p in ids)
        if n_tok <= limit:
            return False
        out[SAMPLES] = None
        out[ERROR] = (f"prompt is {n_tok} tokens, above the {limit} that fit the model context "
                      "(max_model_len - max_tokens - repair room); raise max_model_len or shorten the conversation")
        return True

    async def _record(self, row: Row, orders: list, ids: list[list[int]], gens: list, out: Row) -> None:
        repairs = []  # (sample dict, prefix token ids)
        n = len(row[RESPONSES])
        for (order, _), prompt_ids, samples in zip(orders, ids, gens):
            for g in samples:
                s = {"order": order, "text": g.text, "scores": None, "valid": False, "meta_score": None,
                     "kept": False, "repaired": False, "hinted": self._hinted(row), "n_tokens": g.n_tokens}
                shown = parse_scores(g.text, n)
                # a sample cut at max_tokens counts only if its text ends in the box: else the box is one the
                # critique quoted (say a response's own \boxed{42}) before its Scores line was reached
                if g.finish_reason not in ("stop", "length"):  # aborted by the engine ("abort", "error"): no vote
                    pass
                elif g.finish_reason == "length" and (shown is None or not g.text.rstrip().endswith("}")):
                    repairs.append((s, list(prompt_ids) + list(g.token_ids)))  # continued from its own tokens
                elif shown is not None:
                    s.update(scores=voting.unshuffle(shown, order), valid=True)
                out[SAMPLES].append(s)
        if repairs:
            tails = await self.engine.arepair([p for _, p in repairs], [n] * len(repairs))
            for (s, _), tail in zip(repairs, tails):
                s["text"] += tail.text
                s["n_tokens"] += tail.n_tokens
                s["repaired"] = True
                shown = parse_scores(tail.text, n)  # the repair's own box: a failed repair never falls back
                if shown is not None:               # on a box the cut critique had quoted
                    s.update(scores=voting.unshuffle(shown, s["order"]), valid=True)

    def _done(self, item: Row, drawn: int, rounds: int) -> bool:
        remaining = self.cfg.k - drawn
        if remaining <= 0:
            return True
        valid = [s for s in item[SAMPLES] if s["valid"]]
        return self._decided([s["scores"] for s in valid], remaining, rounds, [s["order"] for s in valid])

    def _decided(self, valid: list[list[int]], remaining: int, rounds: int, orders: list | None = None) -> bool:
        """The adaptive rule on the valid score rows so far (shown in `orders`), `remaining` samples to come."""
        if not valid or len(valid[0]) < 2:
            return False
        if self.cfg.adaptive == "exact":
            return voting.decided_exact([sum(col) for col in zip(*valid)], remaining)
        return voting.decided_confident(valid, remaining, self.cfg.risk, orders)


class MetaScorer:
    """Rate every valid sample with the meta RM; the ratings decide which samples vote."""

    needs = (MESSAGES, RESPONSES, SAMPLES, ERROR)
    adds = pa.schema([SAMPLED.field(SAMPLES)])

    def __init__(self, cfg: JobConfig, engine: Any = None):
        if engine is None:
            from .engines import meta_engine
            engine = meta_engine(cfg)
        self.engine = engine

    def __call__(self, rows: list[Row]) -> list[Row]:
        """Blocking `acall`."""
        return asyncio.run(self.acall(rows))

    async def acall(self, rows: list[Row]) -> list[Row]:
        """Each row's valid samples go to the engine as soon as the row is reached; rows do not wait on each other."""
        await gather_all(self._row(r) for r in rows if r[ERROR] is None and r[SAMPLES])
        return [{SAMPLES: r[SAMPLES]} for r in rows]

    async def _row(self, row: Row) -> None:
        targets = [s for s in row[SAMPLES] if s["valid"]]
        items = [(row[MESSAGES], [row[RESPONSES][j] for j in s["order"]], s["text"]) for s in targets]
        for s, score in zip(targets, await self.engine.ascore(items) if items else []):
            s["meta_score"] = score


class Vote:
    """Plain or meta-guided voting -> rewards, winner, margin, tie and counts per item."""

    needs = (ID, RESPONSES, SAMPLES, ERROR)
    adds = VOTED

    def __init__(self, cfg: JobConfig):
        self.k_meta = cfg.voting_k_meta
        self.seed = cfg.seed

    def __call__(self, rows: list[Row]) -> list[Row]:
        return [self._one(r) for r in rows]

    def _one(self, row: Row) -> Row:
        samples = row[SAMPLES] or []
        if row[ERROR] is not None:
            out = {f.name: None for f in VOTED}
            out.update(samples=row[SAMPLES], error=row[ERROR], n_samples=len(samples), n_valid=0, n_kept=0)
            return out
        result = voting.vote(samples, k_meta=self.k_meta, seed=item_seed(self.seed, row[ID]),
                             n=len(row[RESPONSES]))
        kept = set(voting.select_kept(samples, self.k_meta))
        for j, s in enumerate(samples):
            s["kept"] = j in kept
        error = None
        if not kept:
            error = (f"no valid sample: none of {len(samples)} samples ended in a parseable \\boxed{{...}} "
                     f"with {len(row[RESPONSES])} scores (try --structured or a larger --max-tokens)")
        return {**result, SAMPLES: samples, ERROR: error}

