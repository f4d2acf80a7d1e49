"""A small real site build shared by the build and browser tests (one per test session).

The model is the demo architecture with random weights saved to a temporary folder (real
forward passes, no dependence on the trained weights); the site source (mkdocs.yml and the
hand-written pages under site/) is copied to a temporary folder so that the build's generated
pages never touch the checkout.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from random_demo import save_random_demo

ROOT = Path(__file__).resolve().parents[1]
SMALL_PAIRS = 4
SMALL_EXPLAINERS = ["relevancy.modality", "attention.raw", "embedding.projection"]  # the last runs on a sample set


def copy_site_source(dst: Path) -> Path:
    """mkdocs.yml, its theme overrides and the static pages under site/ (not generated ones) into
    ``dst``; returns the config's path."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ROOT / "mkdocs.yml", dst / "mkdocs.yml")
    shutil.copytree(ROOT / "overrides", dst / "overrides")
    shutil.copytree(ROOT / "site", dst / "site", ignore=shutil.ignore_patterns("generated", "reports", ".xmllm-*"))
    return dst / "mkdocs.yml"


@dataclass
class SmallSite:
    out: Path
    config: Path
    model: Path
    cache: Path
    first: object
    second: object
    first_seconds: float
    second_seconds: float


def build_small_site(root: Path) -> SmallSite:
    from reports.build import BuildOptions, build_site

    config = copy_site_source(root / "src")
    model = save_random_demo(root / "model")
    opts = BuildOptions(out=root / "public", config=config, model=str(model), pairs=SMALL_PAIRS,
                        cache=root / "cache", explainers=list(SMALL_EXPLAINERS), progress=False)
    t = time.perf_counter()
    first = build_site(opts)
    first_seconds = time.perf_counter() - t
    t = time.perf_counter()
    second = build_site(opts)
    second_seconds = time.perf_counter() - t
    return SmallSite(root / "public", config, model, root / "cache", first, second, first_seconds, second_seconds)


@pytest.fixture(scope="session")
def small_site(tmp_path_factory: pytest.TempPathFactory) -> SmallSite:
    return build_small_site(tmp_path_factory.mktemp("small-site"))
