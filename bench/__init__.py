"""Benchmarks of grm-ray: every figure is a ratio of two measurements taken in one run.

    python -m bench.run_all            # 1-3 with small settings on CPU (a few minutes), then 4; rewrites RESULTS.md
    python -m bench.overhead           # 1. pipeline tokens/s over a plain vllm.LLM's tokens/s
    python -m bench.prefix             # 2. prompt tokens computed and wall time, shared orderings vs independent
    python -m bench.adaptive           # 3. adaptive exact vs full k (live and replayed), confident replayed
    python -m bench.scale              # 4. the GPU-hours table from results.json and stated assumptions

Engines run in worker subprocesses (bench/worker.py) so each has its own vLLM counters and process state.
The benchmarks report; they never gate (no timed assertions anywhere).
"""
