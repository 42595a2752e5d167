"""Input formats -> the internal row shape (DESIGN.md "Input formats"), errors naming the field, and the
output Arrow schema (DESIGN.md "Output columns")."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from grm_ray import schema as S
from grm_ray.schema import RowError, as_given, detect_format, id_text, normalize, parse_transcript

HH_FILE = Path("/work/shared/data/hh_rlhf_harmless_test_first300.jsonl")


def hh(*turns: tuple[str, str]) -> str:
    return "".join(f"\n\n{'Human' if r == 'user' else 'Assistant'}: {c}" for r, c in turns)


# --------------------------------------------------------------------------- format detection


@pytest.mark.parametrize("columns, fmt", [
    (["prompt", "responses"], "responses"),
    (["messages", "responses", "label", "id"], "responses"),
    (["prompt", "messages", "responses"], "responses"),
    (["prompt", "chosen", "rejected"], "dpo"),
    (["prompt", "chosen", "rejected", "extra"], "dpo"),
    (["chosen", "rejected"], "hh"),
    (["chosen", "rejected", "hh_line"], "hh"),
])
def test_detect_format(columns, fmt):
    assert detect_format(columns) == fmt


@pytest.mark.parametrize("columns", [[], ["responses"], ["prompt"], ["prompt", "chosen"], ["rejected", "text"]])
def test_detect_format_says_what_is_needed(columns):
    with pytest.raises(ValueError, match="responses") as e:
        detect_format(columns)
    assert "chosen" in str(e.value) and "rejected" in str(e.value)


# --------------------------------------------------------------------------- the three formats


def test_prompt_and_responses():
    out = normalize({"prompt": "What is 2+2?", "responses": ["4", "5", "22"], "label": 0}, "responses", 16)
    assert out == {"messages": [{"role": "user", "content": "What is 2+2?"}], "responses": ["4", "5", "22"],
                   "label": 0}


def test_single_response_with_binary_label():
    out = normalize({"prompt": "q", "responses": ["only"], "label": 1}, "responses", 16)
    assert out["responses"] == ["only"] and out["label"] == 1
    assert normalize({"prompt": "q", "responses": ["only"]}, "responses", 16)["label"] is None


def test_a_whole_float_label_is_read_as_an_integer_and_nan_as_no_label():
    """pandas stores an integer column with a missing value as float64 (1.0, NaN)."""
    assert normalize({"prompt": "q", "responses": ["a", "b"], "label": 1.0}, "responses", 16)["label"] == 1
    assert normalize({"prompt": "q", "responses": ["a", "b"], "label": float("nan")}, "responses", 16)["label"] is None
    # kept on a row that cannot be read, too; and a one-response bool label is 0/1
    assert as_given({"prompt": "", "responses": ["a", "b"], "label": 1.0}, "responses")["label"] == 1
    assert normalize({"prompt": "q", "responses": ["a"], "label": True}, "responses", 16)["label"] == 1
    # ids as pandas writes them: as Arrow's cast (the duplicate-id pass) writes them
    assert (id_text(1.0), id_text(7), id_text(float("nan")), id_text("x1")) == ("1", "7", None, "x1")
    assert (id_text(True), id_text(False)) == ("true", "false")  # as Arrow casts bools (the duplicate-id pass)


def test_messages_and_responses_keep_every_turn():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye?"}]
    out = normalize({"messages": msgs, "responses": ["bye", ""]}, "responses", 16)
    assert out["messages"] == msgs
    assert out["responses"] == ["bye", ""]  # an empty response is a legitimate (bad) answer
    assert out["label"] is None


def test_messages_win_over_prompt_when_both_given():
    msgs = [{"role": "user", "content": "from messages"}]
    out = normalize({"prompt": "from prompt", "messages": msgs, "responses": ["a"]}, "responses", 16)
    assert out["messages"] == msgs
    out = normalize({"prompt": "from prompt", "messages": None, "responses": ["a"]}, "responses", 16)
    assert out["messages"] == [{"role": "user", "content": "from prompt"}]


def test_dpo_strings():
    out = normalize({"prompt": "q", "chosen": "good", "rejected": "bad"}, "dpo", 16)
    assert out == {"messages": [{"role": "user", "content": "q"}], "responses": ["good", "bad"], "label": 0}


def test_dpo_trl_conversational():
    row = {"prompt": [{"role": "system", "content": "sys"}, {"role": "user", "content": "q"}],
           "chosen": [{"role": "assistant", "content": "good"}],
           "rejected": [{"role": "assistant", "content": "bad"}]}
    out = normalize(row, "dpo", 16)
    assert out["messages"] == row["prompt"]
    assert out["responses"] == ["good", "bad"]
    assert out["label"] == 0
    # a reply of several assistant messages is scored whole
    two = {**row, "chosen": [{"role": "assistant", "content": "part1"}, {"role": "assistant", "content": "part2"}]}
    assert normalize(two, "dpo", 16)["responses"] == ["part1\n\npart2", "bad"]


def test_hh_transcripts():
    prefix = [("user", "Hi"), ("assistant", "Hello!"), ("user", "Tell me a secret.")]
    row = {"chosen": hh(*prefix, ("assistant", "I can't.")), "rejected": hh(*prefix, ("assistant", "Sure: ..."))}
    out = normalize(row, "hh", 16)
    assert out["messages"] == [{"role": r, "content": c} for r, c in prefix]
    assert out["responses"] == ["I can't.", "Sure: ..."]
    assert out["label"] == 0


def test_parse_transcript_keeps_multiline_turns():
    turns = parse_transcript("\n\nHuman: line one\nline two\n\nAssistant: a\nb", "chosen")
    assert turns == [{"role": "user", "content": "line one\nline two"}, {"role": "assistant", "content": "a\nb"}]


def _hh_rows():
    return [json.loads(line) for line in HH_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_real_hh_rlhf_file_converts_every_row():
    rows = _hh_rows()
    assert len(rows) == 300
    assert detect_format(rows[0].keys()) == "hh"
    for i, row in enumerate(rows):
        out = normalize(row, "hh", 16)
        # an independent reading: split each transcript at its last "\n\nAssistant:"
        c_prefix, c_last = row["chosen"].rsplit("\n\nAssistant:", 1)
        r_prefix, r_last = row["rejected"].rsplit("\n\nAssistant:", 1)
        assert c_prefix == r_prefix, i
        assert out["responses"] == [c_last.removeprefix(" "), r_last.removeprefix(" ")], i
        assert out["label"] == 0
        # the shared prefix is the conversation, ending with the human's query
        assert out["messages"][-1]["role"] == "user", i
        rebuilt = "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}"
                          for m in out["messages"])
        assert rebuilt == c_prefix, i


# --------------------------------------------------------------------------- errors name the field


def _error(row, fmt="responses", max_responses=16) -> str:
    with pytest.raises(RowError) as e:
        normalize(row, fmt, max_responses)
    return str(e.value)


USER = [{"role": "user", "content": "q"}]


@pytest.mark.parametrize("row, field", [
    ({"prompt": "q"}, "'responses'"),
    ({"prompt": "q", "responses": None}, "'responses'"),
    ({"prompt": "q", "responses": []}, "'responses'"),
    ({"prompt": "q", "responses": "just one string"}, "'responses'"),
    ({"prompt": "q", "responses": {"a": 1}}, "'responses'"),
    ({"prompt": "q", "responses": ["a", None]}, "'responses[1]'"),
    ({"prompt": "q", "responses": ["a", 3]}, "'responses[1]'"),
    ({"prompt": None, "responses": ["a"]}, "'prompt'"),
    ({"responses": ["a"]}, "'prompt'"),
    ({"prompt": "", "responses": ["a"]}, "'prompt'"),
    ({"prompt": "  \n ", "responses": ["a"]}, "'prompt'"),
    ({"prompt": 5, "responses": ["a"]}, "'prompt'"),
    ({"messages": [], "responses": ["a"]}, "'messages'"),
    ({"messages": ["hi"], "responses": ["a"]}, "'messages[0]'"),
    ({"messages": [{"role": "user"}], "responses": ["a"]}, "'messages[0]'"),
    ({"messages": [{"role": "user", "content": None}], "responses": ["a"]}, "'messages[0].content'"),
    ({"messages": [{"role": "user", "content": 7}], "responses": ["a"]}, "'messages[0].content'"),
    ({"messages": USER + [{"role": "assistant", "content": "A"}, {"role": "user", "content": " "}],
      "responses": ["a"]}, "'messages[2].content' is empty"),
    ({"messages": USER + [{"role": "assistant", "content": "a"}], "responses": ["a"]}, "'messages'"),
    ({"messages": [{"role": "bot", "content": "q"}], "responses": ["a"]}, "'messages[0].role'"),
    ({"messages": [{"role": "Human", "content": "q"}], "responses": ["a"]}, "'messages[0].role'"),
    ({"prompt": "q", "responses": ["a", "b"], "label": 2}, "'label'"),
    ({"prompt": "q", "responses": ["a", "b"], "label": -1}, "'label'"),
    ({"prompt": "q", "responses": ["a", "b"], "label": True}, "'label'"),
    ({"prompt": "q", "responses": ["a", "b"], "label": "0"}, "'label'"),
    ({"prompt": "q", "responses": ["a", "b"], "label": 1.5}, "'label'"),
    ({"prompt": "q", "responses": ["a", "b"], "label": 2.0}, "'label'"),
    ({"prompt": "q", "responses": ["a"], "label": 2}, "'label'"),
    ({"prompt": "q", "responses": [b"ok", b"\xff\xfe"]}, "'responses[1]'"),
])
def test_responses_format_errors_name_the_field(row, field):
    msg = _error(row)
    assert field in msg


def test_end_with_user_turn_message():
    msg = _error({"messages": USER + [{"role": "assistant", "content": "a"}], "responses": ["a"]})
    assert "user turn" in msg


def test_invalid_utf8_is_reported_as_such():
    msg = _error({"prompt": "q", "responses": [b"\xff\xfe"]})
    assert "UTF-8" in msg and "'responses[0]'" in msg
    msg = _error({"prompt": "q", "chosen": b"\xc3", "rejected": "b"}, "dpo")
    assert "UTF-8" in msg and "'chosen'" in msg
    msg = _error({"chosen": b"\n\nHuman: x\n\nAssistant: \xff", "rejected": hh(("user", "x"), ("assistant", "b"))},
                 "hh")
    assert "UTF-8" in msg and "'chosen'" in msg


def test_valid_utf8_bytes_are_decoded():
    out = normalize({"prompt": "q", "responses": ["a", "caf\u00e9".encode()]}, "responses", 16)
    assert out["responses"] == ["a", "café"]


def test_bytes_prompt_is_decoded_like_other_text_fields():
    out = normalize({"prompt": "caf\u00e9?".encode(), "responses": ["a"]}, "responses", 16)
    assert out["messages"] == [{"role": "user", "content": "café?"}]
    msg = _error({"prompt": b"\xff", "responses": ["a"]})
    assert "UTF-8" in msg and "'prompt'" in msg


def test_too_many_responses():
    msg = _error({"prompt": "q", "responses": ["a", "b", "c"]}, max_responses=2)
    assert "'responses'" in msg and "max_responses=2" in msg and "3" in msg
    assert normalize({"prompt": "q", "responses": ["a", "b"]}, "responses", 2)["responses"] == ["a", "b"]
    # DPO and HH rows hold two responses, so they obey the limit too
    assert "max_responses" in _error({"prompt": "q", "chosen": "a", "rejected": "b"}, "dpo", max_responses=1)


@pytest.mark.parametrize("row, field", [
    ({"prompt": "q", "chosen": None, "rejected": "b"}, "'chosen'"),
    ({"prompt": "q", "chosen": "a", "rejected": None}, "'rejected'"),
    ({"prompt": "q", "chosen": "a", "rejected": 3}, "'rejected'"),
    ({"prompt": None, "chosen": "a", "rejected": "b"}, "'prompt'"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "'prompt'"),
    ({"prompt": [{"role": "user", "content": ""}], "chosen": "a", "rejected": "b"}, "'prompt[0].content'"),
    ({"prompt": USER + [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"}, "'prompt'"),
    ({"prompt": USER, "chosen": [{"role": "assistant", "content": None}], "rejected": "b"}, "'chosen[0].content'"),
    ({"prompt": USER, "chosen": [], "rejected": "b"}, "'chosen' is an empty list of messages"),
    ({"prompt": USER, "chosen": [{"role": "user", "content": "I am user"}], "rejected": "b"}, "'chosen[0].role' is 'user'"),
])
def test_dpo_errors_name_the_field(row, field):
    assert field in _error(row, "dpo")


@pytest.mark.parametrize("row, expect", [
    # no assistant turn at all, or nothing before it
    ({"chosen": hh(("user", "hi")), "rejected": hh(("user", "hi"), ("assistant", "b"))},
     ["'chosen'", "assistant turn"]),
    ({"chosen": hh(("user", "hi"), ("assistant", "a")), "rejected": hh(("assistant", "b"))},
     ["'rejected'", "nothing before its last assistant turn"]),
    # not a transcript at all
    ({"chosen": "hi there", "rejected": hh(("user", "hi"), ("assistant", "b"))}, ["'chosen'", "HH-RLHF"]),
    ({"chosen": "", "rejected": hh(("user", "hi"), ("assistant", "b"))}, ["'chosen'"]),
    ({"chosen": None, "rejected": hh(("user", "hi"), ("assistant", "b"))}, ["'chosen'"]),
    # the transcripts differ before the last assistant turn
    ({"chosen": hh(("user", "hi"), ("assistant", "a")), "rejected": hh(("user", "ho"), ("assistant", "b"))},
     ["'chosen'", "'rejected'", "do not share the conversation", "character 10", "Human: hi'", "Human: ho'"]),
    ({"chosen": hh(("user", "x"), ("assistant", "y"), ("user", "z"), ("assistant", "a")),
      "rejected": hh(("user", "x"), ("assistant", "Y"), ("user", "z"), ("assistant", "b"))},
     ["'chosen' and 'rejected' do not share the conversation"]),
])
def test_hh_errors_name_the_field(row, expect):
    msg = _error(row, "hh")
    for part in expect:
        assert part in msg


def test_hh_response_is_the_text_after_the_last_assistant_marker():
    # consecutive assistant turns: the conversation ends with one, the responses are the last ones
    row = {"chosen": hh(("user", "x"), ("assistant", "a"), ("assistant", "a2")),
           "rejected": hh(("user", "x"), ("assistant", "a"), ("assistant", "b"))}
    out = normalize(row, "hh", 16)
    assert out["messages"] == [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}]
    assert out["responses"] == ["a2", "b"]


def test_hh_inline_human_marker_is_text():
    # the shape of the rows the old parser refused: an inline '  Human:' (no blank line) inside a turn
    conv = hh(("user", "Hi"), ("assistant", "Hello.  Human: and then?  Assistant: more"), ("user", "Go on"))
    row = {"chosen": conv + "\n\nAssistant: Sure.  Human: thanks", "rejected": conv + "\n\nAssistant: No."}
    out = normalize(row, "hh", 16)
    assert out["messages"] == [{"role": "user", "content": "Hi"},
                               {"role": "assistant", "content": "Hello.  Human: and then?  Assistant: more"},
                               {"role": "user", "content": "Go on"}]
    assert out["responses"] == ["Sure.  Human: thanks", "No."]
    # the same inline marker in only one transcript's earlier turn: a shared-conversation error, both named
    bad = {"chosen": row["chosen"], "rejected": row["rejected"].replace("Hello.  Human:", "Hello.")}
    msg = _error(bad, "hh")
    assert "'chosen' and 'rejected' do not share the conversation" in msg and "no final" not in msg


@pytest.mark.parametrize("chosen, rejected, messages, responses", [
    # an empty response is a legitimate (bad) answer; a missing space after the colon is fine
    (hh(("user", "q"), ("assistant", "a")), "\n\nHuman: q\n\nAssistant:", [("user", "q")], ["a", ""]),
    # a transcript that starts without its blank line, and a response holding a blank line and markers' words
    ("Human: q\n\nAssistant: a\n\nsecond paragraph", "Human: q\n\nAssistant: Human: b",
     [("user", "q")], ["a\n\nsecond paragraph", "Human: b"]),
    # a response that holds a '\n\nHuman:' turn: the response is only what follows the LAST assistant marker
    (hh(("user", "q"), ("assistant", "a"), ("user", "more")) + "\n\nAssistant: c",
     hh(("user", "q"), ("assistant", "a"), ("user", "more")) + "\n\nAssistant: r",
     [("user", "q"), ("assistant", "a"), ("user", "more")], ["c", "r"]),
])
def test_hh_edge_cases_are_scored(chosen, rejected, messages, responses):
    out = normalize({"chosen": chosen, "rejected": rejected}, "hh", 16)
    assert out["messages"] == [{"role": r, "content": c} for r, c in messages]
    assert out["responses"] == responses and out["label"] == 0


def test_real_hh_rows_with_inline_markers_and_diverging_prefixes():
    """Real rows, edited as the refused public rows look: an inline marker in both (scored) or one (error)."""
    row = _hh_rows()[0]
    first = row["chosen"].index("\n\nAssistant:")
    inline = {k: v[:first] + "  Human: really?" + v[first:] for k, v in row.items()}
    out = normalize(inline, "hh", 16)
    assert out["messages"][0]["content"].endswith("  Human: really?")
    assert out["responses"] == normalize(row, "hh", 16)["responses"]
    diverged = {"chosen": inline["chosen"], "rejected": row["rejected"]}
    msg = _error(diverged, "hh")
    assert "'chosen' and 'rejected'" in msg and f"character {first}" in msg


def test_unknown_format_is_a_programming_error():
    with pytest.raises(ValueError, match="unknown input format"):
        normalize({"prompt": "q", "responses": ["a"]}, "jsonl", 16)


# --------------------------------------------------------------------------- output schema


def test_output_columns_match_the_design():
    fields = {f.name: f.type for f in S.OUTPUT_FIELDS}
    assert list(fields)[:6] == ["id", "source", "messages", "responses", "label", "error"]
    assert fields["rewards"] == pa.list_(pa.float64())
    assert fields["vote_totals"] == pa.list_(pa.float64())
    assert pa.types.is_integer(fields["best_index"])
    assert fields["margin"] == pa.float64()
    assert fields["tie"] == pa.bool_()
    for name in ("n_samples", "n_valid", "n_kept"):
        assert pa.types.is_integer(fields[name])
    assert fields["error"] == pa.string()
    sample = fields["samples"].value_type
    types = {sample.field(i).name: sample.field(i).type for i in range(sample.num_fields)}
    assert types["order"] == pa.list_(pa.int32()) and types["scores"] == pa.list_(pa.int32())
    assert types["text"] == pa.string() and types["valid"] == pa.bool_()
    assert types["meta_score"] == pa.float64() and types["kept"] == pa.bool_()
    # each column appears once
    assert len(fields) == len(S.OUTPUT_FIELDS)


def test_an_hh_conversation_without_a_query_is_a_row_error():
    """Scored against no query at all, such a row would still get a confident-looking label."""
    for conv in (hh(("user", "")), hh(("user", "  ")), hh(("assistant", "Hello!")),
                 hh(("user", "hi"), ("assistant", "yo"), ("user", ""))):
        msg = _error({"chosen": conv + "\n\nAssistant: a", "rejected": conv + "\n\nAssistant: b"}, "hh")
        assert "field 'chosen'" in msg and "no query" in msg


def test_messages_must_be_a_list_and_a_null_one_names_the_column_the_file_has():
    msg = _error({"messages": '[{"role": "user", "content": "hi"}]', "responses": ["a", "b"]})
    assert "field 'messages' must be a list" in msg and "'prompt'" in msg  # a JSON string is not the query
    assert _error({"messages": None, "responses": ["a", "b"]}) == "field 'messages' is null"
    assert "field 'prompt'" in _error({"messages": None, "prompt": None, "responses": ["a", "b"]})
    out = normalize({"messages": None, "prompt": "hi", "responses": ["a"]}, "responses", 16)
    assert out["messages"] == [{"role": "user", "content": "hi"}]
