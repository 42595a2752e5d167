"""grm-ray: reward labels from a generative reward model with inference-time scaling, on Ray + vLLM.

The notebook API is pure Python (no Ray, no vLLM):
    render_grm_prompt(conversation, responses) -> the GRM user message
    parse_scores(text, n)                      -> n ints in 1..10, or None
    vote(samples, k_meta=None, seed=0)         -> rewards, vote_totals, best_index, margin, tie, counts
    rule_reward(scores, label)                 -> +1 / -1, the paper's rule-based RL reward
and the Ray Data API:
    score_dataset(ds, **options)               -> the scored rows of a Ray Dataset, lazily
"""
from .dataset import score_dataset
from .export import rule_reward
from .parsing import parse_scores
from .prompts import render_grm_prompt
from .voting import vote

__all__ = ["parse_scores", "render_grm_prompt", "rule_reward", "score_dataset", "vote"]
__version__ = "0.1.0"
