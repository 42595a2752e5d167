"""Training data from a scored table, in TRL's column conventions.

- export_dpo: preference pairs (prompt, chosen, rejected) for DPOTrainer.
- export_best_of_n: rejection-sampling SFT data (prompt, completion) for SFTTrainer.
- export_rft, export_meta, rule_reward: SPCT data (GRM_SPEC section 8): the GRM's own correct trajectories
  for rejective fine-tuning, and its samples labelled correct / incorrect for training a meta RM.

fmt "standard" writes strings; "conversational" writes {role, content} message lists, to which TRL applies
the model's chat template itself. A standard prompt is the query text when the conversation is one user
turn, else the role-labelled transcript of prompts.format_conversation ("User: ...\\nAssistant: ...\\nUser: ...");
for multi-turn data prefer "conversational", which keeps the turns as messages.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Iterator, Sequence

import pyarrow as pa

from . import schema as S
from .prompts import format_conversation, meta_input, meta_messages, render_grm_prompt

FORMATS = ("standard", "conversational")


def rule_reward(scores: Sequence[int] | None, label: int, threshold: int = 6) -> int:
    """GRM_SPEC section 8: +1 when a sample's scores (ORIGINAL order) are correct for `label`, else -1.

    n >= 2: the labelled best must score strictly highest. One response with a 0/1 label: correct when
    (score >= threshold) == (label == 1). Unparseable (None) and ties count as wrong.
    >>> rule_reward([8, 3], 0), rule_reward([5, 5], 0), rule_reward([7], 1), rule_reward(None, 1)
    (1, -1, 1, -1)
    """
    if label is None:
        raise ValueError("rule_reward needs a label")
    if not scores:
        return -1
    if len(scores) == 1:
        return 1 if (scores[0] >= threshold) == (label == 1) else -1
    if not 0 <= label < len(scores):
        raise ValueError(f"label {label} is out of range for {len(scores)} scores")
    best = scores[label]
    return 1 if all(s < best for i, s in enumerate(scores) if i != label) else -1


def _rows(table: pa.Table) -> Iterator[dict[str, Any]]:
    for batch in table.to_batches():
        yield from batch.to_pylist()


def _check(fmt: str) -> bool:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    return fmt == "conversational"


def _prompt(messages: list[dict[str, str]], conversational: bool) -> Any:
    if conversational:
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return format_conversation(messages)


def _reply(text: str, conversational: bool) -> Any:
    return [{"role": "assistant", "content": text}] if conversational else text


def _types(conversational: bool) -> tuple[pa.DataType, pa.DataType]:
    """Arrow types of (prompt, reply) columns."""
    if conversational:
        return pa.list_(S.MESSAGE_TYPE), pa.list_(S.MESSAGE_TYPE)
    return pa.string(), pa.string()


def _undecided(row: dict[str, Any]) -> str | None:
    """Why a row's vote did not name one best response out of several (None when it did): a skip reason."""
    if row.get(S.ERROR) is not None:
        return "row errors"
    if row.get(S.REWARDS) is None:
        return "rows without a vote"
    if len(row[S.REWARDS]) < 2:
        return "single-response rows"
    if any(smp.get("hinted") for smp in row.get(S.SAMPLES) or []):  # the vote would only repeat the label
        return "hinted rows (--hint showed the GRM the label)"
    return "ties for the top" if row.get(S.TIE) else None


def _skip(skipped: Counter | None, reason: str) -> None:
    if skipped is not None:
        skipped[reason] += 1


def export_dpo(table: pa.Table, min_margin: float = 0.0, fmt: str = "standard",
               skipped: Counter | None = None) -> pa.Table:
    """One pair per decided item: chosen = `best_index`, rejected = the lowest reward (earliest on a tie).

    `margin` = chosen_reward - rejected_reward, and min_margin compares THIS pair margin, not the table's
    `margin` column (best minus runner-up): it is the gap behind this pair's preference. For pairs the two
    agree. Skipped: errors, rows without a valid sample, single responses, hinted rows, ties for the top,
    margin < min_margin, pairs of two identical texts;
    `skipped` (when given) counts them by reason, for telling a user why an export is empty.
    """
    conv = _check(fmt)
    prompt_t, reply_t = _types(conv)
    schema = pa.schema([("prompt", prompt_t), ("chosen", reply_t), ("rejected", reply_t),
                        ("chosen_reward", pa.float64()), ("rejected_reward", pa.float64()),
                        ("margin", pa.float64()), ("id", pa.string())])
    out = []
    for row in _rows(table):
        if why := _undecided(row):
            _skip(skipped, why)
            continue
        rewards, best = row[S.REWARDS], row[S.BEST_INDEX]
        worst = min(range(len(rewards)), key=lambda i: (rewards[i], i))
        margin = rewards[best] - rewards[worst]
        if margin < min_margin:
            _skip(skipped, f"pairs below --min-margin {min_margin:g}")
            continue
        if row[S.RESPONSES][best] == row[S.RESPONSES][worst]:  # the GRM told one text apart from itself
            _skip(skipped, "pairs whose two responses are the same text")
            continue
        out.append({"prompt": _prompt(row[S.MESSAGES], conv),
                    "chosen": _reply(row[S.RESPONSES][best], conv),
                    "rejected": _reply(row[S.RESPONSES][worst], conv),
                    "chosen_reward": rewards[best], "rejected_reward": rewards[worst],
                    "margin": margin, "id": row[S.ID]})
    return pa.Table.from_pylist(out, schema=schema)


def export_best_of_n(table: pa.Table, min_margin: float = 0.0, fmt: str = "standard",
                     skipped: Counter | None = None) -> pa.Table:
    """Rejection-sampling SFT data: the best response of each decided item as `completion`.

    Skipped as in export_dpo; here min_margin compares the table's `margin` column (best minus runner-up),
    the gap behind the choice of this one response. Single-response rows are skipped: nothing was chosen.
    """
    conv = _check(fmt)
    prompt_t, reply_t = _types(conv)
    schema = pa.schema([("prompt", prompt_t), ("completion", reply_t), ("reward", pa.float64()),
                        ("margin", pa.float64()), ("id", pa.string())])
    out = []
    for row in _rows(table):
        why = _undecided(row) or (f"items below --min-margin {min_margin:g}" if row[S.MARGIN] < min_margin else None)
        if why:
            _skip(skipped, why)
            continue
        best = row[S.BEST_INDEX]
        out.append({"prompt": _prompt(row[S.MESSAGES], conv), "completion": _reply(row[S.RESPONSES][best], conv),
                    "reward": row[S.REWARDS][best], "margin": row[S.MARGIN], "id": row[S.ID]})
    return pa.Table.from_pylist(out, schema=schema)


def _judged_samples(row: dict[str, Any], threshold: int,
                    skipped: Counter | None = None) -> list[tuple[int, dict[str, Any], bool]]:
    """(index, sample, correct) for the valid samples of a labelled row without error; [] otherwise."""
    if row.get(S.ERROR) is not None or row.get(S.LABEL) is None:
        _skip(skipped, "row errors" if row.get(S.ERROR) is not None else "unlabelled rows")
        return []
    judged = [(i, s, rule_reward(s["scores"], row[S.LABEL], threshold) == 1)
              for i, s in enumerate(row.get(S.SAMPLES) or []) if s["scores"] is not None]
    if not judged:
        _skip(skipped, "rows without a valid sample")
    return judged


def _hint(row: dict[str, Any], sample: dict[str, Any]) -> int | None:
    """Position of the labelled best in the sample's shown order, when the sample was hinted.

    A single response has no 'best response' to name, so it is never hinted (as the sampler renders it).
    """
    if sample.get("hinted") and len(row[S.RESPONSES]) > 1:
        return list(sample["order"]).index(row[S.LABEL])
    return None


def export_rft(table: pa.Table, threshold: int = 6, fmt: str = "standard",
               skipped: Counter | None = None) -> pa.Table:
    """Rejective fine-tuning data: the correct trajectories of items that are not too easy.

    A valid sample is kept when rule_reward is +1. An item is dropped when it has no label, or is "too easy":
    every sample drawn WITHOUT a hint is correct (at least one such; an unparseable one is not correct, as
    GRM_SPEC 8 counts it). Hinted samples do not count towards "too easy" -- a hint makes them right by
    design -- so an item sampled only with hints keeps its correct samples. `prompt` is the GRM user message
    the sample saw (responses in its shown order, plus the hint line when hinted); `completion` is the sample
    text; `sample` indexes the row's `samples`.
    """
    conv = _check(fmt)
    prompt_t, reply_t = _types(conv)
    schema = pa.schema([("prompt", prompt_t), ("completion", reply_t), ("id", pa.string()),
                        ("sample", pa.int64())])
    out = []
    for row in _rows(table):
        judged = _judged_samples(row, threshold, skipped)
        correct = {i for i, _, ok in judged if ok}
        unhinted = [i in correct for i, s in enumerate(row.get(S.SAMPLES) or []) if _hint(row, s) is None]
        if unhinted and all(unhinted):
            _skip(skipped, "too easy (every unhinted sample correct)")
            continue
        if judged and not any(ok for _, _, ok in judged):
            _skip(skipped, "rows without a correct sample")
        for i, s, ok in judged:
            if ok:
                shown = [row[S.RESPONSES][j] for j in s["order"]]
                prompt = render_grm_prompt(row[S.MESSAGES], shown, hint=_hint(row, s))
                out.append({"prompt": [{"role": "user", "content": prompt}] if conv else prompt,
                            "completion": _reply(s["text"], conv), "id": row[S.ID], "sample": i})
    return pa.Table.from_pylist(out, schema=schema)


def export_meta(table: pa.Table, threshold: int = 6, tokenizer: Any = None, fallback: str = "plain",
                skipped: Counter | None = None) -> pa.Table:
    """Meta-RM training data: every valid sample of a labelled item, `label` 1 if correct by rule_reward, else 0.

    `messages` is the meta-RM chat (prompts.meta_messages, responses in the sample's shown order; the
    assistant turn is the sample text). `text` is that chat rendered for a sequence-classification trainer:
    with `tokenizer`'s chat template when given (pass the meta RM's, e.g. DeepSeek-GRM-27B-MetaRM's), else
    the `fallback` of prompts.apply_chat_template. A rendered template may already hold the BOS token:
    tokenise `text` with add_special_tokens=False. For a one-logit BCE head, cast `label` to float.
    """
    schema = pa.schema([("messages", pa.list_(S.MESSAGE_TYPE)), ("text", pa.string()), ("label", pa.int64()),
                        ("id", pa.string()), ("sample", pa.int64())])
    out = []
    for row in _rows(table):
        for i, s, ok in _judged_samples(row, threshold, skipped):
            chat = meta_messages(row[S.MESSAGES], [row[S.RESPONSES][j] for j in s["order"]], s["text"])
            text = meta_input(tokenizer, chat, fallback)
            out.append({"messages": chat, "text": text, "label": int(ok), "id": row[S.ID], "sample": i})
    return pa.Table.from_pylist(out, schema=schema)
