"""Shared fixtures. Tests that need Fashion-MNIST skip when it is absent, unless FBALIGN_REQUIRE_DATA=1
(set by `make test`, which installs it), where a missing data set is a failure."""

from __future__ import annotations

import os

import pytest
import torch

from fbalign.data import DATA_HINT, FASHION_MNIST_DIR


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def fashion_mnist_dir():
    if not (FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").exists() and not (
        FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte").exists():
        message = f"Fashion-MNIST not found under {FASHION_MNIST_DIR}: {DATA_HINT['fashion-mnist']}"
        if os.environ.get("FBALIGN_REQUIRE_DATA") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return FASHION_MNIST_DIR



@pytest.fixture
def one_thread():
    """One intra-op thread, for tests of tiny nets: faster, and steadier on a machine shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
