"""Fixtures; the shared helpers are in `helpers.py` (importing it here sets the offline environment for the run)."""

import helpers
import pytest


@pytest.fixture
def gpt2():
    return helpers.tiny_gpt2()
