"""Test-wide settings."""

import os
import random
import zlib

import pytest
import torch

from sffn_lab.variants.plugins import from_environment, load

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run in Triton's CPU interpreter, so they are tested everywhere.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# $SFFN_PLUGINS: a user's variants join every test that iterates over the registered kinds (README, "How to add a
# variant")
load(",".join(from_environment()))


def pytest_addoption(parser):
    parser.addoption("--seed", type=int, default=None, help="Replay the randomised tests with this seed.")


@pytest.fixture(autouse=True)
def seed(request) -> int:
    """Every test: a seed applied to torch's and Python's global RNGs and printed, so a failing randomised test
    shows its seed and ``pytest --seed N TEST`` replays it. The seed is ``--seed N``; else, under CI (the
    environment variable CI set to true or 1, as ``.ci/run`` does), one fixed per test (a CRC of its id), so CI
    replays the same draws every run; else a fresh random one, so local runs keep exploring."""
    value = request.config.getoption("--seed")
    if value is None and os.environ.get("CI", "").lower() in ("true", "1"):
        value = zlib.crc32(request.node.nodeid.encode()) % 2**31
    if value is None:
        value = random.SystemRandom().randrange(2**31)
    torch.manual_seed(value)
    random.seed(value)
    print(f"seed {value}: replay with pytest --seed {value} {request.node.nodeid}")
    return value


@pytest.fixture
def device() -> torch.device:
    """CUDA where there is one, else the CPU (where Triton runs in its interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def fp32_ieee():
    """fp32 products without TF32 for the duration of a test (the float64 comparisons' tolerances assume it)."""
    from sffn_lab.kernels.precision import fp32_matmul_precision

    with fp32_matmul_precision("highest"):
        yield
