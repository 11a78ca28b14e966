"""Fixtures shared by the folders under tests/; the shared helpers are in `helpers.py` (importing it here sets the
offline environment for the run)."""

import helpers
import pytest


@pytest.fixture
def gpt2():
    return helpers.tiny_gpt2()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The recipe tests' tiny pretrained-looking models and data files (tools/ and the recipes' reruns in
    trainer/test_resume.py), built once per test module."""
    root = tmp_path_factory.mktemp("recipes")
    return {
        "gpt2": helpers.save_tiny_gpt2(root / "gpt2"),
        "marian": helpers.save_tiny_marian(root / "marian"),
        "text": helpers.write_text_files(root / "text"),
        "pairs": helpers.write_translation_files(root / "pairs"),
        "cache": root / "cache",
    }
