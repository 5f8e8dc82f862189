# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build is enough for the demo and tests; with a GPU, install the CUDA build of torch first.
TORCH_SPEC ?= torch==2.13.0
DEMO := demo-out

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install -q -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	rm -rf $(DEMO)
	$(BIN)/python examples/synthetic_checkpoint.py $(DEMO)/deepseek-tiny-bf16 --preset tiny --shard_size 2MB
	$(BIN)/modelopt-streaming quantize --input_dir $(DEMO)/deepseek-tiny-bf16 --dry_run --mlp_only
	$(BIN)/modelopt-streaming quantize --input_dir $(DEMO)/deepseek-tiny-bf16 \
		--output_dir $(DEMO)/deepseek-tiny-nvfp4 --mlp_only --max_shard_size 2MB
	@ls -l $(DEMO)/deepseek-tiny-nvfp4

test: $(VENV)/.installed-test
	$(BIN)/ruff check modelopt_streaming tests examples bench
	$(BIN)/python -m pytest -q

bench: $(VENV)/.installed-test
	$(BIN)/python bench/bench_quantize.py

clean:
	rm -rf $(DEMO) $(VENV)
