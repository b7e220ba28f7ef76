# Two commands do everything on a fresh 2-core CPU machine:
#   make demo   -> set up .venv, fetch ML-100K + SmolLM2, run the quickstart pipeline on a local Ray cluster
#   make test   -> set up .venv, fetch ML-100K, run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MLLMREC := $(VENV)/bin/mllmrec
CONFIG ?= configs/quickstart.yaml
STAMP := $(VENV)/.installed

.PHONY: setup fetch demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --upgrade pip
	$(PY) -m pip install -qq -e '.[cpu,test]'
	# CUDA builds pulled in by dependencies break `from vllm import LLM` on CPU (ENV-NOTES)
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	touch $(STAMP)

setup: $(STAMP)

fetch: setup
	$(MLLMREC) data fetch ml-100k
	$(MLLMREC) models fetch smollm2-135m

demo: fetch
	$(MLLMREC) pipeline --config $(CONFIG)

test: setup
	$(MLLMREC) data fetch ml-100k
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

BENCH_DATA ?= runs/quickstart/data

bench: fetch
	$(PY) -m pip install -q -e '.[bench]'
	test -f $(BENCH_DATA)/samples.parquet || $(MLLMREC) pipeline --config $(CONFIG) --only prepare
	$(PY) benchmarks/rollout.py --data $(BENCH_DATA)
	$(PY) benchmarks/grpo_vs_trl.py --data $(BENCH_DATA) --steps 3 --json benchmarks/results/grpo_vs_trl.json
	$(PY) benchmarks/learner_phases.py --overlap
	$(PY) benchmarks/stage1.py --data $(BENCH_DATA)
	$(PY) benchmarks/eval_throughput.py --data $(BENCH_DATA) --config $(CONFIG)

clean:
	rm -rf runs
