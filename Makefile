# devmapd developer entry points. Every target installs what it needs into .venv.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Dev/CI pin: a CPU build of torch 2.13.0 is on disk here; a looser pin pulls a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: demo test check bench bench-quick serve clean install-service

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PIN)
	$(BIN)/pip install --quiet -e '.[test]' $(TORCH_PIN)
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/devmapd demo

# The checks first (seconds), then the suite across the cores (pytest-xdist).
test: $(STAMP) check
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(JOBS) $(PYTEST_ARGS)

JOBS ?= auto

check: $(STAMP)
	$(BIN)/ruff check -q .
	$(BIN)/lint-imports --no-cache --no-logo
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m benchmarks

bench-quick: $(STAMP)
	$(BIN)/python -m benchmarks --quick

# Install the systemd service from this venv (see README, Operations). ARGS=--dry-run to preview.
install-service: $(STAMP)
	sudo $(BIN)/devmapd install-service $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
