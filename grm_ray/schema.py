"""Input formats -> one internal row shape, and the output Arrow schema.

Internal row: {id, source, messages: [{role, content}], responses: [str], label: int | None, error}.
Every failure names the field; the caller adds the file and row (`source`).
"""
from __future__ import annotations

import re
from typing import Any, Iterable

import pyarrow as pa

# Column names the job adds to the input columns, each with its meaning.
ID = "id"                    # the input's `id`, or "<file>#<row>" when it has none
SOURCE = "source"            # "<file>#<row>": where the row came from; the resume key
MESSAGES = "messages"        # the conversation as chat messages; the last user turn is the query
RESPONSES = "responses"      # the candidate responses, in input order
LABEL = "label"              # index of the labelled best response; for one response 1 = good, 0 = bad
REWARDS = "rewards"          # mean kept score per response, 1..10
VOTE_TOTALS = "vote_totals"  # sum of kept scores per response
BEST_INDEX = "best_index"    # argmax of vote_totals, ties broken by a seeded RNG
MARGIN = "margin"            # best reward minus the best other reward
TIE = "tie"                  # whether the top total was shared
CONFIDENCE = "confidence"    # posterior probability that more samples would not change best_index (null: n=1)
N_SAMPLES = "n_samples"      # samples drawn (fewer than k when adaptive stopping saved some)
N_VALID = "n_valid"          # samples whose scores parsed
N_KEPT = "n_kept"            # samples that voted (top k_meta by meta score, or all valid)
SAMPLES = "samples"          # every sample with its critique text: the audit trail
ERROR = "error"              # why the row has no scores; null when fine
CONTENT_KEY = "content_key"  # sha256 of the normalised item and the result-changing options (--reuse matches it)
REUSED = "reused"            # the label was taken from a previous output (--reuse), not sampled in this run

FORMATS = ("responses", "dpo", "hh")

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])
SAMPLE_TYPE = pa.struct([
    ("order", pa.list_(pa.int32())),       # original indices, in the order shown to the GRM
    ("text", pa.string()),                 # the GRM's generated principles, critique and scores
    ("scores", pa.list_(pa.int32())),      # in ORIGINAL response order; null when invalid
    ("valid", pa.bool_()),
    ("meta_score", pa.float64()),          # meta-RM rating; null without meta RM or if invalid; NaN: too long for it
    ("kept", pa.bool_()),                  # whether this sample voted
    ("repaired", pa.bool_()),              # cut at max_tokens, finished by a constrained continuation
    ("hinted", pa.bool_()),                # the prompt named the labelled best response
    ("n_tokens", pa.int32()),              # generated tokens
])

NORMALIZED = pa.schema([
    (ID, pa.string()), (SOURCE, pa.string()), (MESSAGES, pa.list_(MESSAGE_TYPE)),
    (RESPONSES, pa.list_(pa.string())), (LABEL, pa.int64()), (ERROR, pa.string()), (CONTENT_KEY, pa.string()),
])
SAMPLED = pa.schema([(SAMPLES, pa.list_(SAMPLE_TYPE)), (ERROR, pa.string())])
VOTED = pa.schema([
    (REWARDS, pa.list_(pa.float64())), (VOTE_TOTALS, pa.list_(pa.float64())), (BEST_INDEX, pa.int64()),
    (MARGIN, pa.float64()), (TIE, pa.bool_()), (CONFIDENCE, pa.float64()), (N_SAMPLES, pa.int64()),
    (N_VALID, pa.int64()), (N_KEPT, pa.int64()), (SAMPLES, pa.list_(SAMPLE_TYPE)), (ERROR, pa.string()),
])
OUTPUT_FIELDS = [*NORMALIZED, *(f for f in VOTED if f.name not in NORMALIZED.names), pa.field(REUSED, pa.bool_())]


class RowError(ValueError):
    """A row that cannot be scored; the message names the field."""


def detect_format(columns: Iterable[str]) -> str:
    """Pick the input format from column names; raises ValueError saying what is missing."""
    cols = set(columns)
    if RESPONSES in cols and ({"prompt", MESSAGES} & cols):
        return "responses"
    if {"prompt", "chosen", "rejected"} <= cols:
        return "dpo"
    if {"chosen", "rejected"} <= cols:
        return "hh"
    raise ValueError(
        f"cannot tell the input format from columns {sorted(cols)}: need `prompt` or `messages` with "
        "`responses`; or `prompt`, `chosen` and `rejected`; or HH-RLHF `chosen` and `rejected` transcripts"
    )


def required_columns(fmt: str) -> list[str]:
    return {"responses": [RESPONSES], "dpo": ["prompt", "chosen", "rejected"], "hh": ["chosen", "rejected"]}[fmt]


def _text(value: Any, field: str, allow_empty: bool = False) -> str:
    if value is None:
        raise RowError(f"field '{field}' is null")
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RowError(f"field '{field}' is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if not isinstance(value, str):
        raise RowError(f"field '{field}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RowError(f"field '{field}' is empty")
    return value


def _messages(value: Any, field: str) -> list[dict[str, str]]:
    if isinstance(value, (str, bytes)) and field == MESSAGES:  # say a JSON string: never scored as the query
        raise RowError(f"field '{field}' must be a list of {{role, content}} messages, got a string "
                       "(plain text goes in 'prompt')")
    if isinstance(value, (str, bytes)) or value is None:
        return [{"role": "user", "content": _text(value, field)}]
    if not isinstance(value, (list, tuple)) or not value:
        raise RowError(f"field '{field}' must be a string or a non-empty list of {{role, content}} messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise RowError(f"field '{field}[{i}]' must be a {{role, content}} mapping, got {type(m).__name__}")
        missing = [key for key in ("role", "content") if key not in m]
        if missing:
            raise RowError(f"field '{field}[{i}]' has no {' or '.join(repr(key) for key in missing)}")
        role = _text(m["role"], f"{field}[{i}].role")
        if role not in ("system", "user", "assistant"):
            raise RowError(f"field '{field}[{i}].role' is {role!r}; expected system, user or assistant")
        # a user turn must say something (as a plain prompt must); an empty system or assistant turn may stand
        out.append({"role": role, "content": _text(m["content"], f"{field}[{i}].content", allow_empty=role != "user")})
    if out[-1]["role"] != "user":
        raise RowError(f"field '{field}' must end with a user turn (the query); it ends with {out[-1]['role']}")
    return out


def _whole(value: Any) -> Any:
    """pandas writes an integer column that has a missing value as float64: 1.0 -> 1, NaN -> None."""
    if isinstance(value, float) and (value != value or value.is_integer()):
        return None if value != value else int(value)
    return value


def id_text(value: Any) -> str | None:
    """An input `id` as the output's string: an int, or a whole float (pandas), as its decimal text, as
    Arrow's cast writes it (plan's duplicate-id pass reads ids that way); NaN or null: no id."""
    value = _whole(value)
    if isinstance(value, bool):  # as Arrow casts it: "true"
        return str(value).lower()
    return None if value is None else str(value)


def read_marker(columns: Iterable[str]) -> str:
    """The column that is null on the rows whose input could not be read as an item (theirs carry `error`):
    `content_key`; in outputs written before it existed, `responses`."""
    return CONTENT_KEY if CONTENT_KEY in columns else RESPONSES


def as_given(row: Any, fmt: str | None) -> dict[str, Any]:
    """An unreadable row's own `messages`, `responses` and `label`, each where it fits its output column.

    The responses format reads those input columns as the output's, so a row error must not blank them: the
    input is kept. A value of another shape (a string where a list belongs) stays null; `content_key` stays
    null, which is what marks the row as an input error.
    """
    if fmt != "responses" or not isinstance(row, dict):
        return {}
    out: dict[str, Any] = {}
    responses, messages, label = row.get(RESPONSES), row.get(MESSAGES), row.get(LABEL)
    if isinstance(responses, (list, tuple)) and all(r is None or isinstance(r, str) for r in responses):
        out[RESPONSES] = list(responses)
    if isinstance(messages, (list, tuple)) and all(
            isinstance(m, dict) and all(isinstance(m.get(k), (str, type(None))) for k in ("role", "content"))
            for m in messages):
        out[MESSAGES] = [{"role": m.get("role"), "content": m.get("content")} for m in messages]
    label = _whole(label)
    if isinstance(label, int) and -(2**63) <= label < 2**63:
        out[LABEL] = int(label)
    return out


def _reply(value: Any, field: str) -> str:
    """A DPO `chosen`/`rejected`: a string, or TRL's conversational list of the assistant's messages (their
    contents joined by a blank line when there are several: the whole reply is scored)."""
    if not isinstance(value, (list, tuple)):
        return _text(value, field, allow_empty=True)
    if not value:
        raise RowError(f"field '{field}' is an empty list of messages")
    parts = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "content" not in m:
            raise RowError(f"field '{field}[{i}]' must be a {{role, content}} mapping")
        if m.get("role", "assistant") != "assistant":
            raise RowError(f"field '{field}[{i}].role' is {m.get('role')!r}; a reply's messages are the assistant's")
        parts.append(_text(m["content"], f"{field}[{i}].content", allow_empty=True))
    return "\n\n".join(parts)


_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ ]?")  # a marker opens a turn only after a blank line
_LAST = "\n\nAssistant:"


def parse_transcript(text: str, field: str) -> list[dict[str, str]]:
    """'\\n\\nHuman: hi\\n\\nAssistant: yo' -> [{user, hi}, {assistant, yo}].

    A turn starts only at a marker after a blank line: an inline 'Human:' inside a turn is text. Text before
    the first marker (none in the public data) is read as a user turn.
    """
    parts = _TURN.split(text)
    roles = {"Human": "user", "Assistant": "assistant"}
    turns = [{"role": "user", "content": parts[0]}] if parts[0].strip() else []
    turns += [{"role": roles[parts[i]], "content": parts[i + 1]} for i in range(1, len(parts), 2)]
    if not turns:
        raise RowError(f"field '{field}' is not an HH-RLHF transcript (expected '\\n\\nHuman: ...' turns)")
    return turns


def split_hh(text: str, field: str) -> tuple[str, str]:
    """An HH-RLHF transcript as its users read it: (conversation, response) split at the LAST
    '\\n\\nAssistant:' (the DPO paper's extract_anthropic_prompt), one space after the colon dropped.

    >>> split_hh("\\n\\nHuman: hi\\n\\nAssistant: yo  Human: more", "chosen")
    ('\\n\\nHuman: hi', 'yo  Human: more')
    """
    at = text.rfind(_LAST)
    if at < 0:
        raise RowError(f"field '{field}' is not an HH-RLHF transcript: it has no assistant turn "
                       "('\\n\\nAssistant: ...') to score")
    conversation, response = text[:at], text[at + len(_LAST):]
    if not conversation.strip():
        raise RowError(f"field '{field}' has nothing before its last assistant turn: no conversation to score")
    return conversation, response.removeprefix(" ")


def _hh(chosen: str, rejected: str) -> tuple[list[dict[str, str]], list[str]]:
    """Both transcripts must share the conversation before their last assistant turn; it is parsed once."""
    (conv, good), (conv_r, bad) = split_hh(chosen, "chosen"), split_hh(rejected, "rejected")
    if conv != conv_r:
        at = next((i for i, (a, b) in enumerate(zip(conv, conv_r)) if a != b), min(len(conv), len(conv_r)))
        raise RowError(
            "fields 'chosen' and 'rejected' do not share the conversation before their last '\\n\\nAssistant:' "
            f"turn: they differ at character {at} (...{conv[max(0, at - 20):at + 30]!r} vs "
            f"...{conv_r[max(0, at - 20):at + 30]!r}), so there is no one prompt the two responses answer")
    turns = parse_transcript(conv, "chosen")  # may end with an assistant turn (consecutive ones in HH-RLHF)
    query = [t["content"] for t in turns if t["role"] == "user"]
    if not query or not query[-1].strip():
        raise RowError(f"field 'chosen' has {'an empty' if query else 'no'} Human turn before its last assistant "
                       "turn: no query to score against")
    return turns, [good, bad]


def normalize(row: dict[str, Any], fmt: str, max_responses: int) -> dict[str, Any]:
    """One input row -> {messages, responses, label}; raises RowError naming the bad field.

    >>> normalize({"prompt": "hi", "chosen": "a", "rejected": "b"}, "dpo", 16)["responses"]
    ['a', 'b']
    """
    label = None
    if fmt == "responses":
        # messages wins; a null one falls back on prompt, and the error names the column the file has
        field = MESSAGES if row.get(MESSAGES) is not None or ("prompt" not in row and MESSAGES in row) else "prompt"
        messages = _messages(row.get(field), field)
        raw = row.get(RESPONSES)
        if raw is None or isinstance(raw, (str, bytes)) or not isinstance(raw, (list, tuple)):
            raise RowError(f"field 'responses' must be a list of strings, got "
                           f"{'null' if raw is None else type(raw).__name__}")
        if not raw:
            raise RowError("field 'responses' is empty")
        responses = [_text(r, f"responses[{i}]", allow_empty=True) for i, r in enumerate(raw)]
        label = _whole(row.get(LABEL))
        if isinstance(label, bool) and len(responses) == 1:  # one response: True is good
            label = int(label)
        top = max(1, len(responses) - 1)  # a single response carries a 0/1 (bad/good) label
        if label is not None and (isinstance(label, bool) or not isinstance(label, int) or not 0 <= label <= top):
            raise RowError(f"field 'label' must be an integer in 0..{top}, got {label!r}")
    elif fmt == "dpo":
        messages = _messages(row.get("prompt"), "prompt")
        responses, label = [_reply(row.get("chosen"), "chosen"), _reply(row.get("rejected"), "rejected")], 0
    elif fmt == "hh":
        messages, responses = _hh(_text(row.get("chosen"), "chosen"), _text(row.get("rejected"), "rejected"))
        label = 0
    else:
        raise ValueError(f"unknown input format {fmt!r}; expected one of {FORMATS}")
    if len(responses) > max_responses:
        raise RowError(f"field 'responses' has {len(responses)} responses, above max_responses={max_responses}")
    return {MESSAGES: messages, RESPONSES: responses, LABEL: label}
