# `make run`: the whole workflow on the embedded default. `make test`: everything CI checks.
# Both create .venv from requirements.txt, every version fixed by constraints.txt, on first use
# (and again when either changes).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CORES ?= 2

# Offline by design: no hub downloads, no update checks, no telemetry.
export NO_ALBUMENTATIONS_UPDATE := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE := disabled
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: run test lint install clean cost retry-downloads test-vlm-env

$(VENV)/.installed: requirements.txt constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r requirements.txt -c constraints.txt
	touch $@

install: $(VENV)/.installed

# Evaluations use one core here (measured: 2 threads gave the tiny models no speed), so two
# run side by side.
run: install
	$(BIN)/snakemake --cores $(CORES) --resources gpu=1 --set-threads evaluate=1
	$(BIN)/snakemake --cores 1 --report results/report.html

lint: install
	$(BIN)/ruff check scripts tests bench
	$(BIN)/ruff format --check scripts tests bench
	$(BIN)/snakemake --lint

test: lint
	$(BIN)/pytest

# The VLM tests under the vLLM environment's transformers (requirements-vlm.txt), in a side venv.
test-vlm-env: install
	tests/vlm_env/check.sh

# `make cost COST="--images 12000000 --gpus 64"`: a run's bill from results/benchmarks (README).
COST ?= --images 12000000 --gpus 64 --cpu-jobs 32 --shard-size 10000
cost: install
	PYTHONPATH=scripts $(BIN)/python -m hic.cost $(COST)

# `make retry-downloads`: download the transient failures (timeouts, 5xx, dropped connections)
# of a finished run again, nothing else; the next `make run` carries the new images through the
# later stages of the shards that gained some. RETRY names the config files the run used.
RETRY ?= --configfile config.yaml
retry-downloads: install
	PYTHONPATH=scripts $(BIN)/python -m hic.retry_downloads $(RETRY)

clean:
	rm -rf results .snakemake
