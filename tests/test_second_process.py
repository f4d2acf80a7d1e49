"""The build's case study beside the examples (:mod:`xmllm.second_process`): the second
process gives the digits the first would, a whole-study cache hit starts no process and loads no
model, a failure in the child comes back as one line, and torch's thread count is put back."""
from __future__ import annotations

import os

import json
import shutil
from pathlib import Path

import pytest
import torch
from random_demo import save_random_demo
from xmllm import XmllmError
from xmllm.cache import RunCache
from xmllm.casestudy import CaseStudyConfig, run_case_study
from xmllm.second_process import MODEL_THREADS, StudyRun, available_cpus
from xmllm.session import ModelSession

PAIRS = 2
needs_two_cpus = pytest.mark.skipif(available_cpus() < 2, reason="the second process runs only with two CPUs")

LONG_CHECKS = os.environ.get("XMLLM_LONG_CHECKS") == "1"
long_check = pytest.mark.skipif(not LONG_CHECKS, reason="a long check: .ci/run runs it as its own step (XMLLM_LONG_CHECKS=1)")



def without_seconds(study: dict) -> dict:
    return {**study, "samples": [{k: v for k, v in s.items() if k != "seconds"} for s in study["samples"]]}


def session(model: Path, cache: Path) -> ModelSession:
    return ModelSession(str(model), RunCache(cache), threads=MODEL_THREADS)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_demo(tmp_path_factory.mktemp("study-model") / "model")


@pytest.mark.slow
@long_check
@needs_two_cpus
def test_second_process_gives_the_in_process_study_and_a_hit_reads_it_whole(model: Path, tmp_path: Path) -> None:
    config = CaseStudyConfig(pairs=PAIRS, seed=3)
    beside = StudyRun.start(session(model, tmp_path / "a"), config, beside=True)
    assert beside.in_second_process
    from_child = beside.result(progress=False)
    assert beside.model_loaded and beside.cache_misses > 0 and beside.seconds and beside.seconds > 0

    here = session(model, tmp_path / "b")
    try:
        in_process = run_case_study(here, config, progress=False)
    finally:
        here.close()
    # same threads in both processes: the same digits (compared as the cache stores them, in JSON),
    # all but each sample's wall-clock seconds
    assert without_seconds(from_child) == without_seconds(json.loads(json.dumps(in_process, sort_keys=True)))

    again = session(model, tmp_path / "a")
    hit = StudyRun.start(again, config, beside=True)
    assert not hit.in_second_process and not again.loaded_now and again.cache.hits == 1
    assert hit.result(progress=False) == from_child


@needs_two_cpus
def test_a_failure_in_the_second_process_is_one_line(model: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    run = StudyRun.start(session(broken, tmp_path / "cache"), CaseStudyConfig(pairs=PAIRS), beside=True)
    assert run.in_second_process
    with pytest.raises(XmllmError) as err:
        run.result(progress=False)
    assert "\n" not in str(err.value) and str(broken) in str(err.value)


def test_the_session_puts_torch_threads_back(model: Path, tmp_path: Path) -> None:
    before = torch.get_num_threads()
    s = ModelSession(str(model), RunCache(tmp_path / "cache"), threads=1)
    s.loaded()
    assert torch.get_num_threads() == 1
    s.close()
    assert torch.get_num_threads() == before


def test_without_other_work_the_study_runs_here(model: Path, tmp_path: Path) -> None:
    s = session(model, tmp_path / "cache")
    try:
        run = StudyRun.start(s, CaseStudyConfig(pairs=1, seed=5), beside=False)
        assert not run.in_second_process
        study = run.result(progress=False)
    finally:
        s.close()
    assert study["results"]["pairs"] == 1 and s.loaded_now


@pytest.mark.slow
@long_check
@needs_two_cpus
def test_the_second_process_takes_examples_from_the_end_and_the_first_reads_them(model: Path, tmp_path: Path) -> None:
    from xmllm.example_reports import build_examples

    ids = ["attention.raw", "relevancy.modality", "gradient.saliency"]
    first = session(model, tmp_path / "cache")
    run = StudyRun.start(first, CaseStudyConfig(pairs=1, seed=7), beside=True, examples=ids, scratch=tmp_path / "s")
    assert run.claim(ids[0])  # the first process takes the first; the second may take the others
    run.result(progress=False)
    assert run.examples == list(reversed(ids))[:len(run.examples)] and ids[0] not in run.examples
    assert len(run.examples) == 2
    made = build_examples(first, run.examples, tmp_path / "reports", False)
    assert not first.loaded_now and first.cache.misses == 0  # made there, read here
    assert set(made) == set(run.examples) and all(ex.cached for ex in made.values())
    assert all((tmp_path / "reports" / f"{eid}.html").is_file() for eid in run.examples)
    run.close()
    assert not list((tmp_path / "s").iterdir())  # the claims are gone with the run
