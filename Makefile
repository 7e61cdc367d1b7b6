# The two README commands: `make pretrain` (set up + main job on the default data) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA ?= data_build/mp
WORKERS ?= 2
export DS_ACCELERATOR ?= cpu

.PHONY: install data pretrain test bench clean

$(VENV)/.installed: requirements.txt setup.py $(wildcard csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -r requirements.txt
	$(BIN)/pip install --no-build-isolation -e .
	touch $@

install: $(VENV)/.installed

# Graphs of the Materials Project set (Ef, band gap) → $(DATA); skipped when already built.
data: install
	@if [ -f $(DATA)/manifest.json ]; then echo "$(DATA) already built"; else \
	  $(BIN)/uae-dist data build --source mp --out $(DATA) --shards 4 --workers $(WORKERS) --resume; fi
	$(BIN)/uae-dist data verify $(DATA) -q
	$(BIN)/uae-dist data info $(DATA)

# Short CPU pretraining on 2 ranks (uae_dist/configs/pretrain.yaml), then the UAE export → runs/pretrain/uae/
pretrain: data
	OMP_NUM_THREADS=1 $(BIN)/deepspeed --num_gpus 2 launch/train.py --config pretrain data.root=$(DATA)

# UAE_REQUIRE_EXT=1 / UAE_REQUIRE_DATA=1: a C++ extension that fails to load, or missing data sets,
# fail the tests instead of falling back or skipping
test: install
	UAE_REQUIRE_EXT=1 UAE_REQUIRE_DATA=1 $(BIN)/python -m pytest -q tests

clean:
	rm -rf build *.egg-info uae_dist/*.so
