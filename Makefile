# One-command setup: `make demo` runs the main job, `make test` runs the tests.
# Both create .venv/ on first use (torch from the pinned wheels, then this package, editable).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
# Offline-safe defaults: never wait on the model hub, never call W&B's servers from tests.
TEST_ENV := HF_HUB_OFFLINE=1 HF_HOME=$(CURDIR)/.cache/hf WANDB_MODE=offline WANDB_SILENT=true \
	WANDB_DISABLE_GIT=true WANDB_ERROR_REPORTING=false MPLBACKEND=Agg TOKENIZERS_PARALLELISM=false

.PHONY: setup demo test bench bench-all browser-deps clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install $(TORCH_PINS)
	SAM2_BUILD_CUDA=0 $(PY) -m pip install -e '.[dev]'  # dev includes the regions extra (sam2: no CUDA extension)
	touch $@

setup: $(VENV)/.installed

demo: setup
	HF_HUB_DOWNLOAD_TIMEOUT=20 MPLBACKEND=Agg $(VENV)/bin/proxyclip-segment weights.fallback_to_random=true $(ARGS)

# As root, installs Chromium for the browser test first; otherwise that test skips with its reason
# ("chromium not found: make browser-deps"), except under CI=true, where a missing browser fails it.
test: setup
	@if [ "$$(id -u)" = "0" ]; then $(MAKE) --no-print-directory browser-deps || echo "browser-deps failed: the browser test will skip"; fi
	$(TEST_ENV) $(PY) -m pytest -q -rs $(PYTEST_ARGS)

bench: setup
	$(TEST_ENV) $(PY) bench/bench_core.py

bench-all: bench
	$(TEST_ENV) $(PY) bench/bench_sweep_dataset.py
	$(TEST_ENV) $(PY) bench/bench_widgets.py
	$(TEST_ENV) $(PY) bench/bench_text_cache.py
	$(TEST_ENV) $(PY) bench/bench_methods.py
	$(TEST_ENV) $(PY) bench/bench_vfms.py
	$(TEST_ENV) $(PY) bench/bench_eval_overlap.py
	$(TEST_ENV) $(PY) bench/bench_vocab.py
	$(TEST_ENV) $(PY) bench/bench_inside.py

# Debian's Chromium for the browser test (tests/ marked `browser`); needs root.
browser-deps:
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)

clean:
	rm -rf $(VENV) .cache outputs multirun .pytest_cache
