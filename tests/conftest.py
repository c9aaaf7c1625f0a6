"""Shared pytest set-up: deterministic XLA, no preallocation, CPU by default, GPU tests gated."""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("JAX_ENABLE_X64", "0")

import pathlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

DATA = pathlib.Path(__file__).parent / "data"


def _has_sm90() -> bool:
    try:
        return any(getattr(d, "compute_capability", "") == "9.0" for d in jax.devices("gpu"))
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_sm90():
        return
    skip = pytest.mark.skip(reason="needs an sm90 GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    return DATA
