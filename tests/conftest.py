"""Fixtures shared by several test modules (pytest hands them to every test that names them).

A module that defines a fixture of the same name uses its own: ``demo`` is the trained demo
checkpoint here, while the intervention tests' ``demo`` is the random demo architecture.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from random_demo import save_random_demo

from xmllm.explainers.models import LoadedModel, load_model

DEMO_FOLDERS = (Path(__file__).resolve().parents[1] / "explainers/demo/weights/final", Path("/tmp/demo-early-run1"))
"""Where the trained demo checkpoint may be: the packaged weights, or an early training run."""


@pytest.fixture(scope="module")
def demo() -> LoadedModel:
    """The trained demo model with eager attention (skips when no checkpoint is present)."""
    for folder in DEMO_FOLDERS:
        if (folder / "config.json").is_file():
            return load_model(folder, device="cpu", dtype="float32", eager_attention=True)
    pytest.skip("no demo-model checkpoint available")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """The random demo model saved as a user's folder: what the audit tests' configs name."""
    return save_random_demo(tmp_path_factory.mktemp("audit-model") / "m")
