# cmoe-vlm: the two quick-start targets (each sets up .venv/ first), plus a few helpers.
PY := .venv/bin/python
export PYTHONWARNINGS ?= ignore::DeprecationWarning
# OMP_WAIT_POLICY and DS_ACCELERATOR: set by the code itself (cmoe_base/runtime.py), for direct commands too

.PHONY: setup demo test test-fast bench flops clean

setup:
	@bash scripts/setup_venv.sh

## Main job: built-in shards -> train the tiny ConceptMoE VLM -> evaluate -> compression report.
demo: setup
	$(PY) train_vlm.py configs/tiny.yaml --builtin $(ARGS)
	$(PY) -m cmoe_vlm.eval --model runs/tiny/final --suite builtin --out runs/tiny/eval --limit 16 \
		--lengths 256 512 --samples 2
	$(PY) -m cmoe_vlm.inspection --model runs/tiny/final --data data/builtin/heldout --out runs/tiny/inspect \
		--num-samples 32 --show 2

## The whole test suite (what CI runs), with lmms-eval's own environment (.venv-lmms/) for its test.
test:
	@bash scripts/setup_venv.sh --lmms
	$(PY) -m pytest -q --durations=15 $(ARGS)

## Everything but the multi-minute training runs.
test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(ARGS)

bench: setup
	$(PY) bench/bench_core.py --out bench/results/core.json
	$(PY) bench/bench_loader.py --out bench/results/loader.json

flops: setup
	$(PY) -m cmoe_vlm.flops configs/tiny.yaml --ratio 2
	$(PY) -m cmoe_vlm.flops configs/paper_a2.5b_60b.yaml --ratio 2 --seq-len 32768

clean:
	rm -rf runs data/builtin .pytest_cache
