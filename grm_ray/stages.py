"""Ray-free batch stages: Normalize, GRMSampler, MetaScorer, Vote.

Each stage declares the columns it needs and the ones it adds; `apply` runs a stage on an Arrow table,
checks one output per input and keeps every other column as it was. Rows that already carry an
`error` pass through untouched, so a bad row is never dropped.
"""
from __future__ import annotations

import hashlib
import logging
import math
from typing import Any, Sequence

import pyarrow as pa

from . import prompts, voting
from .config import JobConfig
from .parsing import parse_scores
from .reuse import content_key, options_digest
from .schema import (CONTENT_KEY, ERROR, ID, LABEL, MESSAGES, NORMALIZED, RESPONSES, SAMPLED, SAMPLES,
                     SOURCE, VOTED, RowError, normalize)

log = logging.getLogger(__name__)
Row = dict[str, Any]


def apply(stage: Any, table: pa.Table) -> pa.Table:
    """Run `stage` on a table: rows of its `needs` in, rows of its `adds` out, same order and count."""
    missing = [c for c in stage.needs if c not in table.column_names]
    if missing:
        raise KeyError(f"{type(stage).__name__} needs columns {missing}; the batch has {table.column_names}")
    rows = table.select(list(stage.needs)).to_pylist()
    out = stage(rows)
    if len(out) != len(rows):
        raise RuntimeError(f"{type(stage).__name__} returned {len(out)} rows for {len(rows)}")
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
            given_id = raw.get(ID) if isinstance(raw, dict) else None
            item: Row = {ID: source if given_id is None else str(given_id), SOURCE: source,
                         MESSAGES: None, RESPONSES: None, LABEL: None, ERROR: None, CONTENT_KEY: None}
            try:
                if file_error:
                    raise RowError(file_error)
                if isinstance(raw, RowError):
                    raise raw
                if given_id is not None and str(given_id) in duplicate_ids:
                    raise RowError(f"field 'id': duplicate id {str(given_id)!r} (ids must be unique)")
                item.update(normalize(raw, fmt, self.cfg.max_responses))
                item[CONTENT_KEY] = content_key(item, self.digest)
            except RowError as e:
                item[ERROR] = f"{file}, row {row}: {e}"
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
            from .engines import GRMEngine
            engine = GRMEngine(cfg)
        self.engine = engine

    def __call__(self, rows: list[Row]) -> list[Row]:
        cfg = self.cfg
        out: list[Row] = [{SAMPLES: None, ERROR: r[ERROR]} for r in rows]
        live = [i for i, r in enumerate(rows) if r[ERROR] is None]
        for i in live:
            out[i][SAMPLES] = []
        drawn = {i: 0 for i in live}
        round_size = {i: self._round_size(len(rows[i][RESPONSES])) for i in live}
        rounds = {i: math.ceil(cfg.k / round_size[i]) for i in live}
        first = {i: self._first_round(len(rows[i][RESPONSES]), round_size[i], rounds[i]) for i in live}
        while live:
            requests = []  # (row index, order, count, prompt, seed)
            for i in live:
                r = rows[i]
                n = len(r[RESPONSES])
                count = min(round_size[i] if drawn[i] else first[i], cfg.k - drawn[i])
                for order, c in prompts.orderings(n, count, seed=item_seed(cfg.seed, r[ID]), start=drawn[i]):
                    # seeded per item, round and order: a rerun repeats, and adaptive rounds draw afresh
                    seed = item_seed(cfg.seed, f"{r[ID]}/{drawn[i]}/{order}")
                    requests.append((i, order, c, self._prompt(r, order), seed))
            too_long = self._check_lengths(requests, out)
            requests = [q for q in requests if q[0] not in too_long]
            gens = self.engine.sample([q[3] for q in requests], [q[2] for q in requests],
                                      [len(rows[q[0]][RESPONSES]) for q in requests],
                                      seeds=[q[4] for q in requests]) if requests else []
            self._record(rows, requests, gens, out)
            for i in live:
                drawn[i] += min(round_size[i] if drawn[i] else first[i], cfg.k - drawn[i])
            live = [i for i in live if i not in too_long and not self._done(out[i], drawn[i], rounds[i])]
        return out

    def _round_size(self, n: int) -> int:
        if self.cfg.adaptive == "off" or n < 2:
            return self.cfg.k
        return min(self.cfg.k, n)

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

    def _check_lengths(self, requests: list, out: list[Row]) -> set[int]:
        """Rows whose prompt would not fit the context get an error instead of sinking the batch."""
        limit = self.engine.max_prompt_tokens
        bad: set[int] = set()
        for (i, *_), n_tok in zip(requests, self.engine.count_tokens([q[3] for q in requests])):
            if n_tok > limit and i not in bad:
                bad.add(i)
                out[i][SAMPLES] = None
                out[i][ERROR] = (f"prompt is {n_tok} tokens, above the {limit} that fit the model context "
                                 "(max_model_len - max_tokens - repair room); raise max_model_len "
                                 "or shorten the conversation")
        return bad

    def _record(self, rows: list[Row], requests: list, gens: list, out: list[Row]) -> None:
        repairs = []  # (sample dict, prompt, n)
        for (i, order, _, prompt, _), samples in zip(requests, gens):
            n = len(order)
            for g in samples:
                s = {"order": order, "text": g.text, "scores": None, "valid": False, "meta_score": None,
                     "kept": False, "repaired": False, "hinted": self._hinted(rows[i]),
                     "n_tokens": g.n_tokens}
                shown = parse_scores(g.text, n)
                if shown is not None:
                    s.update(scores=voting.unshuffle(shown, order), valid=True)
                elif g.finish_reason == "length":
                    repairs.append((s, prompt, n))
                out[i][SAMPLES].append(s)
        if repairs:
            tails = self.engine.repair([p + s["text"] for s, p, _ in repairs], [n for _, _, n in repairs])
            for (s, _, n), tail in zip(repairs, tails):
                s["text"] += tail.text
                s["n_tokens"] += tail.n_tokens
                s["repaired"] = True
                shown = parse_scores(s["text"], n)
                if shown is not None:
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
            from .engines import MetaEngine
            engine = MetaEngine(cfg)
        self.engine = engine

    def __call__(self, rows: list[Row]) -> list[Row]:
        targets, items = [], []
        for r in rows:
            for s in (r[SAMPLES] or []) if r[ERROR] is None else []:
                if s["valid"]:
                    targets.append(s)
                    items.append((r[MESSAGES], [r[RESPONSES][j] for j in s["order"]], s["text"]))
        for s, score in zip(targets, self.engine.score(items) if items else []):
            s["meta_score"] = score
        return [{SAMPLES: r[SAMPLES]} for r in rows]


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

