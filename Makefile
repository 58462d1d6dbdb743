# Two entry points, both idempotent: `make run` (set up, then train on the offline default)
# and `make test` (set up with the dev extra, then run the whole suite).
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The torch pair this project is developed and tested with; override for another platform,
# e.g. `make run TORCH="torch torchvision"`.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
# The suite runs on every core (pytest-xdist), test by test, except that the tests sharing an
# expensive module fixture are one xdist_group (one worker builds it once); `make test PYTEST=`
# runs it in one process.
PYTEST ?= -n auto --dist loadgroup

.PHONY: setup dev run test bench ladder reproduce default-task audit-table studies-doc clean

$(VENV)/.setup: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.dev: $(VENV)/.setup
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.setup
dev: $(VENV)/.dev

run: setup
	$(PY) -m lcredit.train $(ARGS)

test: dev
	$(PY) -m pytest $(PYTEST) $(ARGS)

# make bench [DEVICE=cuda]: every rule against its reference loop, the batched passes against
# loops, and (cpu) the sweep throughput; each writes docs/bench*.json and its README table.
DEVICE ?= cpu
bench: dev
	$(PY) scripts/bench.py --device $(DEVICE) --readme README.md $(ARGS)
	$(PY) scripts/bench_batched.py --device $(DEVICE) --readme README.md
	if [ "$(DEVICE)" = cpu ]; then $(PY) scripts/bench_sweep.py --readme README.md; fi

# Every rule's original form and each lcredit switch on the original ladder, 3 seeds (README).
# About 2 hours on a 2-core CPU; on a GPU machine: make ladder ARGS="--jobs 12 --device cuda".
ladder: setup
	$(PY) scripts/ladder_credit.py --readme README.md $(ARGS)

# The original study's offline results: every reading of each open detail, then the ladder, the
# vector-field pilot and the toy LQ at their original settings against the published numbers
# (docs/reproduction.md, the README's Fidelity summary). Hours on a 2-core CPU (runs already done
# are kept); on a GPU machine: make reproduce ARGS="--jobs 12 --device cuda".
reproduce: setup
	$(PY) scripts/reproduce.py --readme README.md $(ARGS)

# bp, fa, dfa at the defaults (make run's task and budget), frozen and a linear probe, 3 seeds.
default-task: setup
	$(PY) scripts/default_task.py --readme README.md $(ARGS)

# Every rule's default form on the default task and on digits with small_cnn, 3 seeds, judged by
# the protocol (docs/audit.md, the README's audit table). Runs already done are kept. A tiny run
# of the same path: make audit-table ARGS="--seeds 0 --epochs 1 --rules bp,usf --out /tmp/audit".
audit-table: setup
	$(PY) scripts/audit_table.py --readme README.md $(ARGS)

# docs/studies.md, the README's study table and each study config's cost line, from the study
# configs (smoke costs from docs/smoke_times.json, which the smoke tests write when given
# LCREDIT_SMOKE_TIMES=docs/smoke_times.json).
studies-doc: setup
	$(PY) scripts/studies_doc.py --readme $(ARGS)

clean:
	rm -rf $(VENV) outputs multirun studies
