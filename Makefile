# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create and use the local virtual environment .venv/ by themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: demo test bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first (or in the same command): an unpinned torch would pull a large CUDA build
	$(BIN)/python -m pip install --disable-pip-version-check -q "$(TORCH)" -e ".[dev]"
	touch $@

demo: $(BIN)/.installed
	$(BIN)/unmask demo

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) runs
