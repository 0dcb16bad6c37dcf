# The two commands of the README: `make demo` (the main job) and `make test`.
# Each creates .venv and installs what it needs on a fresh machine.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_FLAGS ?=
REPRODUCE_FLAGS ?=
PYTEST_FLAGS ?=
CUDA_PLUGIN := .cache/jax_cuda_plugin

.PHONY: setup fetch-data test test-tools demo reproduce audio-tools clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

# The 10 real MAESTRO performances (README Quickstart) into the ignored .cache/.
fetch-data: setup
	$(PY) -m data_prep.fetch_maestro_samples

test: fetch-data test-tools $(VENV)/.libtpu $(CUDA_PLUGIN)/.installed
	$(PY) -m pytest $(PYTEST_FLAGS) tests

# libtpu beside the CPU jaxlib, pinned to the installed jax (what `.[tpu]` gives on a TPU VM):
# it compiles for TPU topologies on this host (tests/tpu_compile_test.py; BUILD.md section
# "Compiling for TPU topologies"). Installed once; the tests keep jax on the CPU backend.
$(VENV)/.libtpu: $(VENV)/.installed
	$(PY) -m pip install --quiet "jax[tpu]==$$($(PY) -c 'import jax; print(jax.__version__)')"
	touch $@

# jax's CUDA plugin and cuDNN (about 1.6 GB), pinned to the installed jax, into the ignored
# .cache: it compiles for H100 / H200 nodes on this host (tests/gpu_target_test.py; BUILD.md
# section 5). Outside the venv, so only a process given it on PYTHONPATH with
# JAX_PLATFORMS=cpu sees it; without deps, as a compile needs no CUDA runtime.
$(CUDA_PLUGIN)/.installed: $(VENV)/.installed
	version=$$($(PY) -c 'import jax; print(jax.__version__)'); \
	  $(PY) -m pip install --quiet --no-deps --target $(CUDA_PLUGIN) "jax-cuda12-plugin==$$version" \
	    "jax-cuda12-pjrt==$$version" "nvidia-cudnn-cu12>=9.8,<10"
	touch $@

# Test tools (root + apt only; their tests skip with a message elsewhere): headless
# Chromium opens the listening page, shellcheck checks the launchers.
test-tools:
	-@missing=""; command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	  command -v shellcheck >/dev/null 2>&1 || missing="$$missing shellcheck"; \
	  if [ -z "$$missing" ]; then exit 0; fi; \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	    && apt-get update -qq >/dev/null 2>&1 \
	    && apt-get install -y -qq --no-install-recommends $$missing >/dev/null 2>&1 \
	    && echo "installed$$missing"; } \
	  || echo "could not install$$missing (needs root and apt): the browser / launcher tests will skip"

# Optional system tools (root + apt only; skipped with a message elsewhere):
# fluidsynth + a General MIDI soundfont render the demo's MIDI to WAV.
audio-tools:
	-@command -v fluidsynth >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends fluidsynth fluid-soundfont-gm >/dev/null 2>&1 \
	  && echo "installed fluidsynth"; } || echo "fluidsynth unavailable: the demo will skip WAV renderings"

demo: fetch-data audio-tools
	$(PY) -m perceivers_jax.cli.demo $(DEMO_FLAGS)

# The paper's comparison (three models and the size-matched control, three folds) at CPU size
# (71 min measured on the shared 2-core machine, about 30 expected idle: benchmarks/reproduction).
reproduce: fetch-data
	$(PY) -m perceivers_jax.cli.reproduce $(REPRODUCE_FLAGS)

clean:
	rm -rf $(VENV) .cache demo_output reproduce_output
