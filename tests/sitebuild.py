"""A small real site build shared by the build and browser tests (one per test session).

The model is the demo architecture with random weights saved to a temporary folder (real
forward passes, no dependence on the trained weights); the build reads xmllm's own MkDocs
sources and must leave the checkout's site/ exactly as it was (:func:`site_source_files`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from random_demo import save_random_demo

ROOT = Path(__file__).resolve().parents[1]
SMALL_PAIRS = 4
SMALL_EXPLAINERS = ["relevancy.modality", "attention.raw", "embedding.projection"]  # the last runs on a sample set


def site_source_files() -> set[str]:
    """Every file and folder under the checkout's site/ and templates/: a build adds nothing there."""
    return {p.relative_to(ROOT).as_posix() for folder in ("site", "templates") for p in (ROOT / folder).rglob("*")
            if "__pycache__" not in p.parts}


@dataclass
class SmallSite:
    out: Path
    model: Path
    cache: Path
    first: object
    second: object
    first_seconds: float
    second_seconds: float


def build_small_site(root: Path) -> SmallSite:
    from xmllm.build import BuildOptions, build_site

    model = save_random_demo(root / "model")
    before = site_source_files()
    opts = BuildOptions(out=root / "public", model=str(model), pairs=SMALL_PAIRS,
                        cache=root / "cache", explainers=list(SMALL_EXPLAINERS), progress=False)
    t = time.perf_counter()
    first = build_site(opts)
    first_seconds = time.perf_counter() - t
    t = time.perf_counter()
    second = build_site(opts)
    second_seconds = time.perf_counter() - t
    assert site_source_files() == before, "the build wrote into the checkout"
    return SmallSite(root / "public", model, root / "cache", first, second, first_seconds, second_seconds)


@pytest.fixture(scope="session")
def small_site(tmp_path_factory: pytest.TempPathFactory) -> SmallSite:
    return build_small_site(tmp_path_factory.mktemp("small-site"))
