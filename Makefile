# Two entry points: `make demo` and `make test`. Each creates .venv when it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test wheel-check figures bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/residual-probe grad-norms --out results/demo --overwrite

test: $(STAMP)
	$(MAKE) wheel-check
	$(BIN)/python -m pytest -n logical --dist worksteal

# The installed wheel in a fresh venv, run from a temporary folder (.ci/wheel-check).
wheel-check: $(STAMP)
	.ci/wheel-check $(BIN)/python $(PYTHON)

figures: $(STAMP)
	$(BIN)/residual-probe figures --out figures --overwrite

bench: $(STAMP)
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) results build
