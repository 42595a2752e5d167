"""Prompt rendering for the GRM and the meta RM, and balanced response orderings.

The GRM prompt keeps the section markers and response delimiters of the template the released
DeepSeek-GRM models were trained on (GRM_SPEC section 2); the prose is ours.
"""
from __future__ import annotations

import functools
import random
import re
from typing import Any, Sequence

Message = dict[str, str]
Conversation = str | Sequence[Message]

_CRITERIA = """\
1. Instruction Adherence:
   - 9-10: Fully follows every explicit and implicit instruction of the query.
   - 6-8: Follows the main instructions with minor omissions.
   - 3-5: Follows some instructions but misses important ones.
   - 1-2: Ignores or contradicts the instructions.
2. Usefulness:
   - 9-10: Solves the user's problem completely and correctly.
   - 6-8: Helps with most of the problem; small errors or gaps.
   - 3-5: Of limited help; notable errors or gaps.
   - 1-2: Of no help, wrong or harmful.
3. Level of Detail:
   - 9-10: Exactly the detail the query needs, well organised.
   - 6-8: Mostly adequate detail; a little too much or too little.
   - 3-5: Clearly too shallow or padded.
   - 1-2: No useful detail.
4. Relevance:
   - 9-10: Entirely on the query's topic.
   - 6-8: Mostly relevant, with minor digressions.
   - 3-5: Partly off topic.
   - 1-2: Unrelated to the query."""

_GRM_TEMPLATE = """\
You are an expert at scoring responses against judging criteria.

Read the conversation below, whose last round is the user's query, and the responses to be scored. \
Beyond the general criteria given, state further criteria specific to this query together with their weights, \
then give each response an overall score.

Each score is an integer from 1 to 10: 1 means the response meets none of the criteria, 6 means it meets some, \
10 means it meets all of them. Analyse step by step and score strictly.

#### Evaluation Criteria ####
{criteria}

#### Conversation Context ####
{conversation}

#### Responses to be Scored ####
{responses}

#### Output Format Requirements ####
Output exactly three lines:
Specific Criteria: <the query-specific criteria and their weights>
Analysis: <your step-by-step comparison of the responses>
Scores: <one sentence> \\boxed{{{example}}}
The box holds {n} integer score(s), one per response, in the order the responses are shown."""

_JUDGE_TEMPLATE = """\
Below are a conversation, the responses to it, and a critique that scores them.

{body}

#### Critique ####
{critique}

Is this critique correct, and do its scores rank the best response highest? Answer with one word: yes or no."""

HINT_TEMPLATE = "\n\nThe best response is: Response {x}"
META_PREFIX = "Please score the responses."


def to_messages(conversation: Conversation) -> list[Message]:
    """A prompt string becomes one user message; a message list is copied as role/content pairs."""
    if isinstance(conversation, str):
        return [{"role": "user", "content": conversation}]
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in conversation]


def format_conversation(conversation: Conversation) -> str:
    """'User: hi\\nAssistant: hello\\nUser: bye' -- every turn kept; the last user turn is the query."""
    names = {"user": "User", "assistant": "Assistant", "system": "System"}
    return "\n".join(
        f"{names.get(m['role'], m['role'].title())}: {m['content']}" for m in to_messages(conversation)
    )


def format_responses(responses: Sequence[str]) -> str:
    return "\n\n".join(
        f"[The Begin of Response {i}]\n{r}\n[The End of Response {i}]" for i, r in enumerate(responses, 1)
    )


def render_grm_prompt(conversation: Conversation, responses: Sequence[str], hint: int | None = None) -> str:
    """The GRM user message for `responses` shown in the given order.

    `hint` (0-based position in the shown order) appends the paper's hinted-sampling line,
    e.g. hint=1 -> "The best response is: Response 2".
    """
    n = len(responses)
    text = _GRM_TEMPLATE.format(
        criteria=_CRITERIA,
        conversation=format_conversation(conversation),
        responses=format_responses(responses),
        example=", ".join(["x"] * n),
        n=n,
    )
    if hint is not None:
        text += HINT_TEMPLATE.format(x=hint + 1)
    return text


def meta_messages(conversation: Conversation, responses: Sequence[str], sample_text: str) -> list[Message]:
    """The meta-RM chat (GRM_SPEC section 5): user = instruction + context + responses, assistant = the sample."""
    user = (
        f"{META_PREFIX}\n\n#### Conversation Context ####\n{format_conversation(conversation)}\n\n"
        f"#### Responses to be Scored ####\n{format_responses(responses)}"
    )
    return [{"role": "user", "content": user}, {"role": "assistant", "content": sample_text}]


def judge_prompt(conversation: Conversation, responses: Sequence[str], sample_text: str) -> str:
    """User message for the generative yes/no judge; its score is logprob(yes) - logprob(no)."""
    body = meta_messages(conversation, responses, sample_text)[0]["content"][len(META_PREFIX) + 2 :]
    return _JUDGE_TEMPLATE.format(body=body, critique=sample_text)


_TOKENISH = re.compile(r"<[^<>\s]{1,64}>|\[[^\[\]\s]{1,64}\]")  # how special tokens are spelled: <eos>, [INST]


@functools.lru_cache(maxsize=8)
def _specials(tokenizer: Any) -> tuple[frozenset[str], tuple[str, ...]]:
    """The tokenizer's special tokens, and those of them not spelled like _TOKENISH (checked one by one)."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    found = {t.content for t in decoder.values() if getattr(t, "special", False)}
    found |= set(getattr(tokenizer, "all_special_tokens", None) or [])
    found = {t for t in found if len(t) > 1}
    return frozenset(found), tuple(t for t in found if not _TOKENISH.fullmatch(t))


def defuse(tokenizer: Any, text: str) -> str:
    """Data that spells one of the tokenizer's special tokens (a template's `<end_of_turn>`, `</s>`) stays
    text: a zero-width space after its first character keeps the tokenizer from reading it as the control
    token, so a response cannot close the GRM's turn and open one of its own. Other text is unchanged."""
    special, odd = _specials(tokenizer) if tokenizer is not None else (frozenset(), ())
    if not special:
        return text
    cut = lambda t: t[0] + "\u200b" + t[1:]  # noqa: E731
    text = _TOKENISH.sub(lambda m: cut(m.group()) if m.group() in special else m.group(), text)
    for t in odd:
        text = text.replace(t, cut(t))
    return text


def apply_chat_template(tokenizer: Any, messages: list[Message], fallback: str = "plain",
                        add_generation_prompt: bool = True) -> str:
    """Render messages with the tokenizer's own chat template, or a stated fallback when it has none.

    fallback "plain": turns joined as text; "gemma": Gemma's <start_of_turn> markers. The messages' text is
    defused first: only the template makes control tokens.
    """
    messages = [{**m, "content": defuse(tokenizer, m["content"])} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    if fallback == "gemma":
        turns = "".join(
            f"<start_of_turn>{'model' if m['role'] == 'assistant' else 'user'}\n{m['content']}<end_of_turn>\n"
            for m in messages
        )
        return turns + ("<start_of_turn>model\n" if add_generation_prompt else "")
    text = "\n\n".join(m["content"] for m in messages)
    return text + ("\n\n" if add_generation_prompt else "")


def meta_input(tokenizer: Any, chat: list[Message], fallback: str = "plain") -> str:
    """A classifier meta RM's input text: the meta chat (meta_messages) through the model's chat template,
    no generation prompt. Scoring (engines.MetaEngine), export-meta and `train meta-rm` all render with this."""
    return apply_chat_template(tokenizer, chat, fallback=fallback, add_generation_prompt=False)


def special_tokens(tokenizer: Any) -> bool:
    """Whether encoding rendered text adds the tokenizer's special tokens: not when a chat template rendered
    its own (<bos> etc.), as `LLM.chat` does; yes for the template-less fallbacks."""
    return not getattr(tokenizer, "chat_template", None)


def orderings(n: int, k: int, seed: int = 0, start: int = 0) -> list[tuple[list[int], int]]:
    """The response orders of samples start .. start+k-1 of one item, grouped: [(order, count), ...].

    GRM_SPEC section 4. Samples come in blocks of n; block b is a random Latin square drawn from (seed, b):
    its n rows put every response in every position once (pairs: both orders, so k/2 each for even k), and
    its random column and symbol permutations give each block different neighbours (n > 2). A partial block
    (k = 1, the odd sample of an odd k) takes random rows of its square, so the input order has no
    advantage. Sample t's order depends only on (seed, t): a rerun, a resume and adaptive rounds
    (start = samples drawn so far) draw the same orders. Equal orders are grouped so they share a prompt.
    >>> sorted(c for _, c in orderings(2, 4, seed=7))
    [2, 2]
    """
    counts: dict[tuple[int, ...], int] = {}
    for t in range(start, start + max(k, 0)) if n >= 1 else ():
        order = sample_order(n, seed, t)
        counts[order] = counts.get(order, 0) + 1
    return [(list(o), c) for o, c in counts.items()]


def sample_order(n: int, seed: int, t: int) -> tuple[int, ...]:
    """Sample t's order: row (t mod n) of block t // n's random Latin square L[r][p] = sym[(row[r] + col[p]) % n]."""
    return _latin_square(n, seed, t // n)[t % n]


@functools.lru_cache(maxsize=1024)
def _latin_square(n: int, seed: int, block: int) -> tuple[tuple[int, ...], ...]:
    rng = random.Random(f"order:{seed}:{block}")
    sym, row, col = (rng.sample(range(n), n) for _ in range(3))
    return tuple(tuple(sym[(row[r] + col[p]) % n] for p in range(n)) for r in range(n))
