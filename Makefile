# Every target sets itself up from a fresh clone: a virtual environment in .venv with fbalign and its
# dependencies, and Debian's Fashion-MNIST where apt is available.
VENV   ?= .venv
PYTHON ?= python3
# The CPU build of torch (a wheel of it lies on the project's machines); override for CUDA, e.g.
#   make test TORCH='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126'
TORCH  ?= torch==2.13.0
BIN     = $(VENV)/bin

.PHONY: setup data reproduce demo test bench clean

$(BIN)/fbalign: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check $(TORCH)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev,ray]'
	touch $@

setup: $(BIN)/fbalign

data:
	@scripts/get-fashion-mnist.sh || true

# The main job: every experiment of Lillicrap et al. 2016 at quick scale; the report lands in runs/.
reproduce: setup data
	$(BIN)/fbalign reproduce lillicrap2016 --quick --resume

demo: setup data
	$(BIN)/fbalign demo

# Where apt exists the data must be there, so a missing install step fails instead of skipping tests.
test: setup data
	FBALIGN_REQUIRE_DATA=$$(command -v apt-get >/dev/null && echo 1 || echo 0) $(BIN)/python -m pytest -q --durations=15

bench: setup data
	$(BIN)/python benchmarks/step_time.py
	$(BIN)/python benchmarks/epoch_time.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
