# SVLL-ReID — two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SYNTH  := data/synthetic

.PHONY: all venv demo test test-all gpu-check lint bench data clean

all: test

# (Re)install when the package definition or the pins change: the project as an editable package
# (the only install it allows, see setup.py) with every extra, and the test tools, all at the exact
# versions of constraints.txt (pyproject.toml states ranges).
EXTRAS := export,record,index,ablate
$(STAMP): pyproject.toml setup.py constraints.txt requirements-dev.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -r requirements-dev.txt \
		-e '.[$(EXTRAS)]' --config-settings editable_mode=compat
	@touch $(STAMP)

venv: $(STAMP)

data: $(STAMP)
	@test -d $(SYNTH)/bounding_box_train || $(PY) tools/make_synthetic.py --out $(SYNTH)

demo: $(STAMP) data
	$(PY) tools/run_demo.py --config_file configs/demo/vit_svllreid_demo.yml

# Fast tier: every test module's quick tests (about a minute after installation). test-all adds the tests marked
# `slow` (end-to-end trainings, subprocesses, ONNX export, the demo); CI runs test-all.
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

test-all: $(STAMP)
	$(PY) -m pytest -q tests

# The CUDA acceptance suite (tests/gpu, sized for under 5 minutes on one GPU): the environment in its header,
# what it measures at the end and in output/gpu_check.md; without a GPU every test skips with one line.
# GPU_PYTHON=python3: an interpreter that already has a CUDA PyTorch (no .venv needed; docs/speed.md).
GPU_PYTHON ?= $(PY)
gpu-check: $(if $(filter $(PY),$(GPU_PYTHON)),$(STAMP))
	@PYTHONPATH=$(CURDIR) $(GPU_PYTHON) -m pytest -rs -p no:cacheprovider tests/gpu; rc=$$?; \
		if [ $$rc -eq 5 ]; then exit 0; else exit $$rc; fi   # 5: nothing ran (no GPU): a clean skip

# ruff, and the order of the rooms: the import-linter contracts in pyproject.toml
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

bench: $(STAMP)
	$(PY) bench/eval.py
	$(PY) bench/backbone.py
	$(PY) bench/onnx_runtime.py
	$(PY) bench/loader.py
	$(PY) bench/gallery_index.py
	$(PY) bench/train_step.py

# Only what `make demo`, `make data`, `make test` and `make gpu-check` create: training runs of your
# own under output/ (e.g. output/market) are never touched.
DEMO_OUT := output/demo output/demo_cnn output/gpu_check.md

clean:
	rm -rf $(DEMO_OUT) $(SYNTH) .pytest_cache
	@rmdir output 2>/dev/null || true
