# Two commands on a fresh machine: `make test` and `make demo`. Both create the virtualenv when it
# is missing (or when requirements.txt changed) and install the pinned requirements into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The venv's bin first on PATH: DeepSpeed's JIT ops are rebuilt whenever a different ninja is found.
RUN := PATH=$(abspath $(VENV))/bin:$$PATH OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} \
	MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736

.PHONY: venv test test-fast demo bench clean gpu-check

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -r requirements.txt
	@echo "pre-building DeepSpeed's CPU shared-memory comm op (once, ~30 s)"
	@# As a launch does it: into this checkout's .torch_extensions/ (engine/dist.py; a
	@# TORCH_EXTENSIONS_DIR you set wins), so two checkouts never rebuild each other's ops.
	$(RUN) $(PY) -c "from engine import dist; from engine.train import ops; ops.prepare_process(); ops.comm_op_notice(); dist.init_distributed(always=True)" >/dev/null
	@echo "building the CPU top-k's C scan (once, ~1 s; without a compiler the search uses numpy's)"
	-$(RUN) $(PY) -c "from engine.retrieval.native_scan import kernel; kernel()"
	touch $@

# Optional packages (ONNX export) only for the tests: the demo and training never need them.
$(VENV)/.optional: $(VENV)/.installed tests/requirements-optional.txt
	$(PY) -m pip install --quiet -r tests/requirements-optional.txt
	touch $@

test: venv $(VENV)/.optional
	$(RUN) $(PY) -m pytest -q tests

test-fast: venv
	$(RUN) $(PY) -m pytest -q tests/unit

demo: venv
	$(RUN) bash launch/demo.sh

clean:
	rm -rf runs/demo

# ~8 minutes on one H100/H200-class GPU: throughput, MFU, fp16 loss scaling, optimizers, GPU top-k.
# No venv dependency: a lent GPU machine may have no registry access; the script names what is missing.
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
gpu-check:
	$(RUN) $(GPU_PY) tests/benchmarks/gpu_check.py --out runs/gpu_check.json
