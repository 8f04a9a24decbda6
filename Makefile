# Two commands on a fresh machine: `make demo` and `make test`. Each builds .venv from nothing if needed.
PY     := .venv/bin/python
STAMP  := .venv/.installed

.PHONY: demo test test-fast bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	# torch first and pinned: the local CPU wheel; a looser spec would pull GBs of CUDA packages
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m graphopt demo

test: $(STAMP)
	$(PY) -m pytest -n 2 tests

test-fast: $(STAMP)
	$(PY) -m pytest -n 2 -m "not slow" tests

bench: $(STAMP)
	$(PY) bench/fusion.py

clean:
	rm -rf .venv build dist *.egg-info .pytest_cache .hypothesis
