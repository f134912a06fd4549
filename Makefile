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

# The suite starts about 30 Python processes (xdist workers, distributed ranks, CLI subprocesses);
# compiling the sources once here spares each of them compiling what it imports when
# PYTHONDONTWRITEBYTECODE is set (101 s instead of 117 s for the suite on 2 cores).
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(MAKE) wheel-check
	$(BIN)/python -m compileall -q residual_probe tests
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
