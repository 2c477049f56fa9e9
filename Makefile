# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create and use the local virtual environment .venv/ by themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: demo test bench docs clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first (or in the same command): an unpinned torch would pull a large CUDA build
	$(BIN)/python -m pip install --disable-pip-version-check -q "$(TORCH)" -e ".[dev]"
	touch $@

demo: $(BIN)/.installed
	$(BIN)/unmask demo

test: $(BIN)/.installed
	# the page's browser test drives Debian's Chromium (browser downloads are not used): installed here
	# when running as root (CI); elsewhere that test is skipped and the skip reason printed (-rs)
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || echo "could not install chromium"; fi
	# one worker per core (at most 8), each on one thread; a file's tests stay on one worker (its fixtures are built once)
	$(BIN)/python -m pytest -q -rs -n auto --maxprocesses=8 --dist loadfile

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/train_throughput.py

# the documentation site with live reload at http://127.0.0.1:8000/ (`make test` builds it strictly:
# tests/test_docs.py); DOCS_ADDR=0.0.0.0:8000 to serve it beyond this machine
DOCS_ADDR ?= 127.0.0.1:8000
docs: $(BIN)/.installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --dev-addr $(DOCS_ADDR)

clean:
	rm -rf $(VENV) runs
