# Two commands from a fresh clone: `make demo` and `make test`.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.strata-installed

.PHONY: demo test install bench clean

$(VPY):
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip

# CPU torch first (torch==2.13.0 is the build that installs offline here), then strata.
$(STAMP): $(VPY) setup.py
	$(VPY) -m pip install --quiet torch==2.13.0
	$(VPY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VPY) -m strata.training.demo

test: $(STAMP)
	$(VPY) -m pytest -n 2 -q tests

bench: $(STAMP)
	$(VPY) bench/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info
