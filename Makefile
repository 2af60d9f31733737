# Set-up on a fresh machine is part of both targets: `make demo` and `make test` are all a new user needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test install install-test clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e .
	touch $@

# timm is a reference implementation for the parity tests. Its torchvision requirement has no CPU build on the
# package index these machines use, so it is installed without dependencies (see README, "Tests").
# The mobile converters come in the same command as the torch pin, so that none of them can move torch.
$(TEST_STAMP): $(STAMP)
	$(PIP) install -q -e ".[test,mobile]" "$(TORCH_SPEC)"
	$(PIP) install -q --no-deps "timm>=1.0.20"
	touch $@

install: $(STAMP)
install-test: $(TEST_STAMP)

# The main job: every registered model measured on this machine (eager deploy form, batch 1 and 4); prints the
# table and where bench.json / bench.csv / latency_vs_top1.png are. About 1 minute on 2 cores after the set-up.
# (Exported runtimes cost 10-30 s of export per model: `edgevits bench --backends eager,onnxruntime,openvino`.)
demo: $(STAMP)
	$(VENV)/bin/edgevits bench --batch-sizes 1,4 --warmup 1 --budget 0.5 --backends eager --out bench_out

test: $(TEST_STAMP)
	$(PY) -m pytest -n 2 --dist loadgroup -q tests

clean:
	rm -rf $(VENV) build *.egg-info
