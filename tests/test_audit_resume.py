"""Nothing lost: ``kill -9`` an audit mid-run, rerun it, and only the missing samples are computed;
every stored file reads back whole."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from audit_sets import write_config, write_set

from xmllm.audit import load_config, run_audit

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = 10
KILL_AFTER = 2
STARTUP_LIMIT_S = 600


def complete_folders(out: Path) -> list[Path]:
    samples = out / "samples"
    if not samples.is_dir():
        return []
    return [p for p in samples.iterdir() if not p.name.startswith(".") and (p / "record.json").is_file()]


def check_folder(folder: Path) -> dict:
    """Every file of a sample's folder parses: the record, the arrays, the manifest, the images."""
    from xmllm.report.explained import load_run

    record = json.loads((folder / "record.json").read_text(encoding="utf-8"))
    json.loads((folder / "timings.json").read_text(encoding="utf-8"))
    if record["status"] == "ok":
        run = load_run(folder / "run")
        assert run.explanations and run.images
        with np.load(folder / "run" / "explanations.npz") as arrays:
            for key in arrays.files:
                arrays[key]
        for png in (folder / "run").glob("*.png"):
            with Image.open(png) as img:
                img.load()
    return record


@pytest.mark.slow
def test_kill_9_mid_run_then_resume(tmp_path, model):
    write_set(tmp_path / "set", SAMPLES, seed=5)
    cfg = write_config(tmp_path / "audit.yaml", model, checks=["blank_image"], faithfulness={"enabled": False})
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "xmllm.cli", "run", str(cfg), "--no-progress"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + STARTUP_LIMIT_S
        while len(complete_folders(out)) < KILL_AFTER:
            assert proc.poll() is None, f"the audit ended early: {proc.stderr.read().decode()[-500:]}"
            assert time.monotonic() < deadline, "no samples written in time"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    done = complete_folders(out)
    assert KILL_AFTER <= len(done) < SAMPLES, "kill -9 came after the run ended: nothing to resume"
    before = {p.name: check_folder(p) for p in done}
    assert not (out / "audit.json").exists()  # the summary is written last

    outcome = run_audit(load_config(cfg), progress=False)
    assert (outcome.computed, outcome.reused, outcome.total) == (SAMPLES - len(done), len(done), SAMPLES)
    after = {p.name: check_folder(p) for p in complete_folders(out)}
    assert len(after) == SAMPLES and all(after[k] == v for k, v in before.items())
    assert not [p for p in (out / "samples").iterdir() if p.name.startswith(".")]  # leftovers swept
    summary = json.loads((out / "audit.json").read_text(encoding="utf-8"))
    assert summary["counts"]["samples"] == SAMPLES and summary["counts"]["failed"] == 0
