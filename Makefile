# The two commands a new user needs (see README): `make demo` and `make test`.
# Both set up .venv themselves (pip from pyproject.toml, the one place versions are pinned).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CORES ?= 2
export PATH := $(abspath $(VENV))/bin:$(PATH)
# DeepSpeed on a machine without a GPU: CPU accelerator + gloo. Set only where no NVIDIA GPU
# answers `nvidia-smi -L` (a GPU host keeps DeepSpeed's CUDA accelerator); xfusion/engine.py also
# falls back to cpu by itself wherever torch sees no CUDA. An explicit DS_ACCELERATOR wins.
ifeq ($(origin DS_ACCELERATOR),undefined)
ifeq ($(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu),)
export DS_ACCELERATOR := cpu
endif
endif

.PHONY: setup demo demo-fast finetune test test-fast test-slurm slurm-up slurm-down bench mlflow-ui report lavis-env dry-run-slurm clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# The demo's command and summary; $(1): extra Snakemake arguments (the --config of demo-fast).
define run_demo
	time $(VENV)/bin/snakemake --profile local --cores $(CORES) all $(1)
	@echo "Scorecard: results/findings.csv, results/tiny/figures/findings.png"
	@echo "Tables:  $$(ls results/tiny/tables/*.csv | tr '\n' ' ')"
	@echo "         (each also results/<experiment>.csv)"
	@echo "Figures: $$(ls results/tiny/figures/*.png | tr '\n' ' ')"
	@echo "MLflow: make mlflow-ui   Report: make report"
endef

## Tiny scale end to end on this CPU: every table (results/tiny/tables/, copied to results/*.csv),
## figure (results/tiny/figures/) and the findings scorecard (results/findings.csv), each run
## trained with the config's `seeds` (3).
demo: setup
	$(call run_demo,)

## The same with one training seed per run (--config seeds=1): a third of the training, for a
## first look; no intervals, so the scorecard can only read inconclusive.
demo-fast: setup
	$(call run_demo,--config seeds=1)

## Supp. B.1 (README, "Fine-tuning on downstream tasks"): trains finetune.run if the demo has not,
## fine-tunes it on editing, localisation, in/out-painting and VQA, and scores both models:
## results/figureA.csv and results/tiny/figures/figureA.png. Not part of `make demo`.
finetune: setup
	time $(VENV)/bin/snakemake --profile local --cores $(CORES) results/tiny/tables/figureA.csv results/tiny/figures/figureA.png
	cp results/tiny/tables/figureA.csv results/figureA.csv
	@echo "Table: results/figureA.csv   Panel: results/tiny/figures/figureA.png"

## The test suite (what CI runs).
test: setup
	$(PY) -m pytest

## Everything but the end-to-end pipeline tests (marked slow).
test-fast: setup
	$(PY) -m pytest -m "not slow"

## A real single-node SLURM cluster on this machine (root; installs slurm-wlm + munge if missing),
## then the tests that submit through it (tests/test_slurm_cluster.py); `make slurm-down` stops it.
slurm-up:
	bash tests/slurm/cluster.sh up

slurm-down:
	bash tests/slurm/cluster.sh down

test-slurm: setup slurm-up
	XFUSION_SLURM_REQUIRED=1 $(PY) -m pytest tests/test_slurm_cluster.py tests/test_slurm_submission.py

## Measured speed ratios, one per line; also written to benchmarks/RESULTS.md.
bench: setup
	$(PY) -m benchmarks.run

## Browse the runs: http://127.0.0.1:5000 (loopback only); paper scale: MLFLOW_TRACKING_URI=sqlite:///results/paper/mlruns.db
mlflow-ui: setup
	$(VENV)/bin/mlflow ui --backend-store-uri $${MLFLOW_TRACKING_URI:-sqlite:///results/tiny/mlruns.db} --host 127.0.0.1 --port 5000

## One HTML file with every table and figure, captioned.
report: setup
	$(VENV)/bin/snakemake --profile local --cores $(CORES) all --report results/report.html

## Plan the paper-scale DAG as SLURM would run it (no SLURM needed for a dry run).
dry-run-slurm: setup
	$(VENV)/bin/snakemake --profile slurm -n results/table1.csv

## Optional BLIP-2 ITM backend from LAVIS in its own venv (LAVIS pins transformers < 4.27).
## eval.itm finds it at .envs/lavis/bin/python (or $$XFUSION_LAVIS_PYTHON); conda users:
## conda env create -p .envs/lavis -f workflow/envs/lavis.yaml
lavis-env:
	$(PYTHON) -m venv .envs/lavis
	.envs/lavis/bin/python -m pip install --quiet --upgrade pip
	.envs/lavis/bin/python -m pip install --quiet torch==2.14.1 salesforce-lavis==1.0.2 "numpy<2" "pandas<2.3"

clean:
	rm -rf results/tiny results/*.csv results/report.html .snakemake
