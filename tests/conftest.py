"""Fixtures; the shared helpers are in `helpers.py` (importing it here sets the offline environment for the run)."""

import os

import pytest

import helpers


def pytest_collection_modifyitems(config, items):
    """`slow` tests (minutes on 2 cores) run only with HF_L2_SLOW_TESTS=1, so the default suite stays short."""
    if os.environ.get("HF_L2_SLOW_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set HF_L2_SLOW_TESTS=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def gpt2():
    return helpers.tiny_gpt2()
