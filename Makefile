# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
FMNIST  := /usr/share/datasets/fashion-mnist

.PHONY: demo test install data clean

install: $(STAMP)

$(STAMP): requirements.txt setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Fashion-MNIST from Debian's package when apt is there; otherwise kdlib falls back to
# torchvision's downloader (where a network exists) or a root given with KDLIB_DATA.
data:
	@if [ ! -f $(FMNIST)/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian package dataset-fashion-mnist"; \
	  (apt-get install -y -qq dataset-fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) >/dev/null; \
	fi

demo: install data
	$(BIN)/python -m kdlib demo --out runs/demo --shards shards/demo

# The checks first (seconds), then the suite: lint and format (ruff), the layers of kdlib/ (import-linter);
# the suite on 2 xdist workers (CI has 2 cores; many tests wait on subprocesses): ~12 min here.
test: install data
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -n 2 --dist worksteal --durations=15 tests

clean:
	rm -rf runs shards/demo
