# bigtrain: two commands for a fresh machine.
#   make demo   - install, then train the default model on the embedded default data (2 ranks, ZeRO-2, CPU ok)
#   make test   - install, then lint (ruff) and run the whole test suite (make test-quick: the fast tier only)
# Everything installs into .venv. TORCH pins the torch build installed first: the default is the CPU
# build this project is tested with; on a GPU machine use e.g. `make demo TORCH='torch==2.13.0' NPROC=1`.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
NPROC ?= 2
BIN := $(VENV)/bin
# DeepSpeed JIT-builds its ops under torch's lock file; a process killed while holding it leaves the lock,
# and every later load waits forever. Inside the venv, a clean clone never inherits one from the home cache.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: install demo test test-quick bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first: a bare `torch` requirement would pull a multi-GB CUDA build on a CPU machine.
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e '.[test]'
	# DeepSpeed JIT-builds a small comm op on first use (~1 min): build it once, here.
	# A lock left by a killed build would make the load wait forever: load_comm_op names it; the wait is bounded.
	timeout 900 $(BIN)/python -c "from bigtrain.distributed import load_comm_op; load_comm_op()"
	touch $@

demo: install
	PATH="$(CURDIR)/$(BIN):$$PATH" GLOO_SOCKET_IFNAME=$${GLOO_SOCKET_IFNAME:-lo} NPROC=$(NPROC) \
		launch/local.sh run_dir=runs/demo-$$(date +%Y%m%d-%H%M%S) $(ARGS)

test: install
	$(BIN)/ruff check bigtrain bench tests tools
	PATH="$(CURDIR)/$(BIN):$$PATH" GLOO_SOCKET_IFNAME=lo $(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-quick: install
	$(BIN)/ruff check bigtrain bench tests tools
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf runs .pytest_cache
