# Two entry points for a fresh machine: `make demo` (environment + the smoke pipeline) and `make test`.
# Both create .venv and install the package into it first; nothing outside this folder is touched.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUN ?= runs/smoke
# Extras installed with the package, e.g. `make test EXTRAS=test,mobile` (read when .venv is (re)built).
EXTRAS ?= test

.PHONY: install demo test test-all lint bench clean

install: $(VENV)/.installed

# Reinstall when the dependency list changes. pip picks the newest torch your platform allows (torch>=2.4);
# install your own torch build into .venv first to keep it.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[$(EXTRAS)]"
	touch $@

demo: install  # re-running continues (finished, unchanged stages are skipped)
	$(VENV)/bin/rslad-edge pipeline --preset smoke --out $(RUN) --resume

test: install
	$(PY) -m pytest -q

test-all: install  # also the slow tests (minutes); gpu tests skip themselves without a GPU
	$(PY) -m pytest -q -m "not gpu"

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache
