"""4. Scale on paper: GPU-hours to label 1M pairs with a 27B GRM on H100s, from measured ratios + assumptions.

Measured (bench/results.json, from 1-2): the pipeline's tokens/s over a plain engine's (efficiency), the
prompt tokens a balanced-ordering request computes (one prompt per ordering plus, per sample, the prompt's
last partial KV block), the prompt length of the packaged pairs. Assumed (flags, defaults argued in
RESULTS.md): generated tokens per sample, H100 decode and prefill throughput and KV room for a 27B model.

    computed prompt tokens per pair = orderings x prompt + k x (block_size - 1) / 2
    GPU-hours = pairs x (k x tokens_per_sample / decode_tps + computed / prefill_tps) / 3600 / efficiency

    python -m bench.scale [--decode-tps 2500 --prefill-tps 8000 --tokens-per-sample 300 --hours 8]
"""
from __future__ import annotations

import argparse
import math
from typing import Any

from bench import common

# Gemma-2-27B (DeepSeek-GRM-27B's base): 46 layers x 16 KV heads x head dim 128 x (K, V) x 2 bytes (bf16).
KV_BYTES_PER_TOKEN = 46 * 16 * 128 * 2 * 2
WEIGHT_BYTES = 27.2e9 * 2


def assumptions_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pairs", type=int, default=1_000_000)
    p.add_argument("--scale-k", type=int, nargs="+", default=[8, 32])
    p.add_argument("--tokens-per-sample", type=int, default=300, help="GRM_SPEC 7: 220-380 Gemma tokens")
    p.add_argument("--prompt-tokens", type=int, nargs="+", default=None,
                   help="prompt tokens per ordering (default: measured on the packaged pairs, and 1500)")
    p.add_argument("--decode-tps", type=float, default=2500, help="generated tokens/s per H100, 27B bf16")
    p.add_argument("--prefill-tps", type=float, default=8000, help="prompt tokens/s per H100, 27B bf16")
    p.add_argument("--gpu-mem-gb", type=float, default=80)
    p.add_argument("--block-size", type=int, default=16, help="vLLM KV block size on GPU (CPU uses 128)")
    p.add_argument("--hours", type=float, default=8, help="wall-clock window the job must fit (overnight)")


def _measured(results: dict[str, Any]) -> dict[str, Any]:
    ov, pre, ad = results.get("overhead", {}), results.get("prefix", {}), results.get("adaptive", {})
    computed = {}
    for row in pre.get("table", []):
        if row["case"].startswith("pairs k="):
            computed[int(row["case"].split("=")[1])] = row["computed_ratio"]
    saved = {}
    for key, r in ad.get("replay", {}).get("exact", {}).items():
        saved[int(key.split("=")[1])] = r["samples_saved"]
    return {"efficiency": min(1.0, ov.get("ratio", 1.0)) if ov else None,
            "prompt_tokens_measured": (ov.get("prompt_tokens_per_ordering") or {}).get("mean"),
            "computed_ratio_cpu": computed, "tail_per_sample_cpu": pre.get("tail_per_extra_sample"),
            "exact_saved": saved}


def compute(results: dict[str, Any], a: argparse.Namespace) -> dict[str, Any]:
    m = _measured(results)
    eff = m["efficiency"] or 1.0
    prompts = a.prompt_tokens or [round(m["prompt_tokens_measured"] or 600), 1500]
    kv_tokens = (a.gpu_mem_gb * 1e9 * 0.9 - WEIGHT_BYTES) / KV_BYTES_PER_TOKEN
    rows = []
    for p_tok in prompts:
        for k in a.scale_k:
            orderings = min(k, 2)
            # Prefix sharing (measured in 2): each ordering's prompt is computed once, and every sample
            # recomputes the prompt's last, partial KV block (on average (block - 1) / 2 tokens). Sharing of
            # the template across items, also seen in 2, is left out (a conservative estimate).
            prefill = orderings * p_tok + k * (a.block_size - 1) / 2
            ratio = prefill / (k * p_tok)
            decode = k * a.tokens_per_sample
            gpu_s = decode / a.decode_tps + prefill / a.prefill_tps
            gpu_h = a.pairs * gpu_s / 3600 / eff
            per_item_kv = orderings * p_tok + k * a.tokens_per_sample
            resident_items = kv_tokens / per_item_kv
            rows.append({
                "prompt_tokens": p_tok, "k": k, "decode_tokens_B": a.pairs * decode / 1e9,
                "prefill_computed_B": a.pairs * prefill / 1e9, "prefill_share_computed": ratio,
                "gpu_hours": gpu_h,
                "actors_for_window": math.ceil(gpu_h / a.hours),
                "resident_items_per_gpu": resident_items, "running_seqs_per_gpu": resident_items * k,
                "batch_size_items": _batch(resident_items),
            })
    return {"assumptions": {k: v for k, v in vars(a).items() if k in (
        "pairs", "tokens_per_sample", "decode_tps", "prefill_tps", "gpu_mem_gb", "hours", "block_size")},
            "prompt_tokens": prompts, "efficiency_used": eff, "kv_tokens_per_gpu": kv_tokens,
            "measured": m, "rows": rows}


def _batch(resident_items: float) -> int:
    """Items per GRM call: 4x what the KV cache holds at once, so a call's straggling tail is a small share."""
    return max(8, 2 ** math.ceil(math.log2(max(1.0, 4 * resident_items))))


def markdown(s: dict[str, Any]) -> str:
    a = s["assumptions"]
    lines = [
        f"Per H100 (27B bf16, TP=1): decode {a['decode_tps']:.0f} tok/s, prefill {a['prefill_tps']:.0f} tok/s, "
        f"KV room {s['kv_tokens_per_gpu'] / 1e3:.0f}k tokens, block size {a['block_size']}; "
        f"{a['tokens_per_sample']} generated tokens per sample; "
        f"pipeline efficiency {s['efficiency_used']:.2f} (measured in 1); window {a['hours']:.0f} h.",
        "",
        "| prompt tok/ordering | k | decode tokens | prompt tokens computed (share of k x prompt) | H100 GPU-hours | "
        "H100 actors to finish in the window | items resident / running seqs per GPU | batch_size (items per call) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in s["rows"]:
        lines.append(
            f"| {r['prompt_tokens']} | {r['k']} | {r['decode_tokens_B']:.1f} B | {r['prefill_computed_B']:.2f} B "
            f"({r['prefill_share_computed']:.2f}) | {r['gpu_hours']:,.0f} | {r['actors_for_window']} | "
            f"{r['resident_items_per_gpu']:.0f} / "
            f"{r['running_seqs_per_gpu']:.0f} | {r['batch_size_items']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    assumptions_parser(p)
    a = p.parse_args()
    s = compute(common.load_results(), a)
    common.save_results("scale", s)
    print(markdown(s))


if __name__ == "__main__":
    main()
