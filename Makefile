# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Everything they write stays under .venv/ (and the demo's .demo/): the checkout stays clean.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# ruff's and pytest's caches live in the virtualenv, not in the checkout.
export RUFF_CACHE_DIR := $(CURDIR)/$(VENV)/ruff-cache
PYTEST := $(BIN)/pytest -o cache_dir=$(CURDIR)/$(VENV)/pytest-cache

.PHONY: install test demo lint format bench clean

# The editable install leaves setuptools' build metadata (*.egg-info) in the checkout; the
# installed metadata is in .venv, so it goes.
$(STAMP): pyproject.toml provider/startup_logs.pth
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q -e '.[train,stack,dev]'
	rm -rf *.egg-info
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(PYTEST) -q

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .demo *.egg-info
