# Tollgate: `make up` runs the gateway on its embedded defaults, `make test` runs the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
CONFIG ?= tollgate.yaml

.PHONY: up test bench lint format render-envoy protos wasm clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@# xds-protos ships an old copy of opentelemetry/proto; put the real package's files back.
	$(BIN)/python -m pip install --quiet --force-reinstall --no-deps 'opentelemetry-proto>=1.45'
	touch $(STAMP)

up: $(STAMP)
	$(BIN)/tollgate up --config $(CONFIG)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/pytest -m slow
	$(BIN)/python -m loadtest --json loadtest/results/latest.json

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# the control API's code, generated from protos/ and checked in (a test keeps it current)
protos: $(STAMP)
	$(BIN)/python -m extproc.protogen

wasm: $(STAMP)  # extproc/stream_trailers.wasm from its hand-written source
	$(BIN)/python -c "import wasmtime, pathlib as p; w = p.Path('extproc/stream_trailers'); \
	w.with_suffix('.wasm').write_bytes(wasmtime.wat2wasm(w.with_suffix('.wat').read_text()))"

render-envoy: $(STAMP)
	$(BIN)/tollgate render-envoy --config $(CONFIG) > envoy/envoy.yaml

clean:
	rm -rf $(VENV) .tollgate .pytest_cache .ruff_cache
