"""``--executor ray``: the same audit on a local Ray instance with two CPU workers (one model per
actor) gives the same files as the local executor."""
from __future__ import annotations

import json
import os

import pytest
import ray
import torch  # a test dependency (users get it with the "distributed" extra): absent, this fails, not skips
from audit_sets import compare_outputs, write_config, write_set

from xmllm.audit import load_config, run_audit


AGENT_WAIT_MS = "300000"
"""How long the raylet waits for its metrics agent: Ray's default gives up on a loaded 2-core
machine before the agent (a Python process) has started."""


@pytest.fixture(scope="module")
def local_ray():
    os.environ.setdefault("RAY_agent_register_timeout_ms", AGENT_WAIT_MS)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_ray_with_two_workers_matches_local(tmp_path, model, local_ray):
    write_set(tmp_path / "set", 4, seed=7)
    cfg = write_config(tmp_path / "audit.yaml", model, checks=["blank_image", "pope"])
    # each actor gets one CPU, so one torch thread: the local run must sum floats in the same
    # order to give the same last bits (two threads differ by ~1e-7, and the manifests say so)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = run_audit(load_config(cfg), tmp_path / "local", progress=False)
    finally:
        torch.set_num_threads(threads)
    assert local.executor["torch_threads"] == 1
    on_ray = run_audit(load_config(cfg, {"executor.kind": "ray", "executor.workers": 2, "executor.num_cpus": 1}),
                       tmp_path / "ray", progress=False)
    assert on_ray.executor["executor"] == "ray" and on_ray.executor["workers"] == 2
    assert on_ray.executor["torch_threads"] == 1
    assert (on_ray.computed, on_ray.total) == (4, 4)
    run_info = json.loads((tmp_path / "ray" / "run.json").read_text())
    assert run_info["executor"] == "ray"
    compare_outputs(local.out, on_ray.out)
    # a rerun on Ray computes nothing
    again = run_audit(load_config(cfg, {"executor.kind": "ray", "executor.workers": 2}), tmp_path / "ray",
                      progress=False)
    assert (again.computed, again.reused) == (0, 4)


def test_a_model_that_cannot_load_fails_once_with_one_line(tmp_path, local_ray):
    write_set(tmp_path / "set", 1)
    cfg = write_config(tmp_path / "audit.yaml", tmp_path / "no-such-model", checks=[])
    with pytest.raises(Exception) as err:
        run_audit(load_config(cfg, {"executor.kind": "ray", "executor.workers": 1}), progress=False)
    assert "no-such-model" in str(err.value) and "\n" not in str(err.value)
