"""``xmllm bench`` end to end on a random-weight demo-architecture model, through the CLI.

No timing assertions: the targets live in the bench's own output. These tests check that the
command discovers and runs every case, measures every sample-level explainer against a plain
greedy generate, and writes well-formed ratios.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch


from random_demo import save_random_demo

from xmllm.explainers.registry import registered
from xmllm.cli import main
from xmllm.commands.bench import discover

ROW_FIELDS = {"case", "group", "metric", "value", "target", "ok", "model", "ours", "reference", "unit", "details"}
EXPLAINER_FIELDS = {"model", "time_ratio", "memory_ratio", "seconds", "generate_seconds", "peak_bytes",
                    "generate_peak_bytes"}


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_random_demo(tmp_path_factory.mktemp("bench") / "demo-random")


@pytest.fixture(scope="module")
def report(model_dir) -> dict:
    code, out, err = run_cli("bench", "--model", str(model_dir), "--quick", "--json", "--no-large")
    assert code == 0, err
    assert "bench" in err  # the progress bar goes to stderr, the JSON alone to stdout
    return json.loads(out)


def sample_explainers() -> list[str]:
    return [eid for eid, cls in registered().items() if cls.scope == "sample"]


@pytest.mark.slow
def test_every_discovered_case_gives_rows(report, model_dir):
    cases = {case.name for case in discover()}
    assert {"attention", "relevancy", "occlusion", "explainer_costs", "reports_site"} <= cases
    assert {row["case"] for row in report["rows"]} == cases
    assert set(report["models"]) == {"demo"}  # --no-large: no 576-token model
    assert report["models"]["demo"]["spec"] == str(model_dir)
    assert report["quick"] is True and set(report["case_seconds"]) == cases
    # the CLI keeps freed memory before any case runs, and the report says which allocator timed them
    assert "freed memory kept" in report["allocator"] or report["allocator"].startswith("system default")


@pytest.mark.slow
def test_rows_are_positive_finite_ratios_with_the_documented_fields(report):
    for row in report["rows"]:
        assert set(row) == ROW_FIELDS, row["group"]
        assert positive(row["value"]), (row["group"], row["metric"], row["value"])
        if row["unit"]:
            assert positive(row["ours"]) and positive(row["reference"]), row
        if row["target"] is None:
            assert row["ok"] is None
        else:
            op, bound = row["target"].split()
            assert op in ("<=", ">=")
            assert row["ok"] == (row["value"] <= float(bound) if op == "<=" else row["value"] >= float(bound))
    targets = [row for row in report["rows"] if row["target"]]
    assert report["targets"]["met"] + report["targets"]["missed"] == len(targets)


@pytest.mark.slow
def test_every_sample_explainer_has_a_time_and_a_memory_ratio(report):
    ids = sample_explainers()
    assert ids and set(report["explainers"]) == set(ids)
    for eid in ids:
        entry = report["explainers"][eid]
        assert set(entry) == EXPLAINER_FIELDS, (eid, entry.get("error"))
        for key in EXPLAINER_FIELDS - {"model"}:
            assert positive(entry[key]), (eid, key, entry[key])
        assert entry["time_ratio"] == pytest.approx(
            next(r["value"] for r in report["rows"] if r["group"] == eid and r["metric"].startswith("time")))
        rows = [r for r in report["rows"] if r["group"] == eid and r["case"] == "explainer_costs"]
        assert [r["unit"] for r in rows] == ["s", "B"]
        assert rows[0]["details"]["same_answer"] is True  # generate produced the explained answer
    # the plain generate is one measurement shared by every explainer's memory ratio
    assert len({e["generate_peak_bytes"] for e in report["explainers"].values()}) == 1


@pytest.mark.slow
def test_the_attention_capture_keeps_fewer_bytes_than_every_steps_attentions(report):
    kept = next(r for r in report["rows"] if r["metric"].startswith("retained bytes"))
    assert kept["reference"] > kept["ours"] > 0 and kept["value"] == pytest.approx(kept["reference"] / kept["ours"])


def test_only_narrows_to_the_named_explainer_and_prints_a_table(model_dir):
    code, out, err = run_cli("bench", "--model", str(model_dir), "--quick", "--no-large", "--only", "lens.logit")
    assert code == 0, err
    lines = out.splitlines()
    table = lines[lines.index("explainers against a plain greedy generate of the same answer:") + 1:]
    assert table[0].split()[:4] == ["explainer", "model", "time", "ratio"]
    body = table[2 : table.index("")]
    assert [line.split()[0] for line in body] == ["lens.logit"]
    assert not any(line.startswith("case ") for line in lines)  # no other case matched
    assert lines[-1] == "targets met: 0 of 0"


def test_the_peak_memory_counter_sees_what_a_function_holds():
    from xmllm.bench.memory import peak_memory

    def hold() -> torch.Tensor:
        kept = torch.ones(1000, 1000)  # 4 MB held to the end
        for _ in range(3):
            scratch = torch.ones(500, 1000)  # 2 MB at a time, freed each round
            del scratch
        return kept

    def grads() -> None:
        x = torch.randn(256, 256, requires_grad=True)
        (x.exp() * 2).sum().backward()  # the graph's saved tensor and the gradient count too

    result, peak = peak_memory(hold, "cpu")
    assert result.shape == (1000, 1000) and peak.bytes == 4_000_000 + 2_000_000
    _, peak = peak_memory(grads, "cpu")
    assert peak.bytes >= 3 * 256 * 256 * 4


@pytest.mark.parametrize("argv, words", [
    (("--repeat", "0"), "--repeat 0"),
    (("--only", "no-such-case"), "no-such-case"),
])
def test_bad_options_are_one_line_errors(argv, words):
    code, out, err = run_cli("bench", "--model", "/nonexistent-model-folder", *argv)
    assert code == 2 and out == ""
    assert err.startswith("xmllm: error:") and words in err and len(err.strip().splitlines()) == 1


def test_a_missing_model_is_a_one_line_error(tmp_path):
    code, out, err = run_cli("bench", "--model", str(tmp_path / "missing"), "--quick", "--no-large")
    assert code == 2 and out == "" and str(tmp_path / "missing") in err
    assert len([line for line in err.splitlines() if line.startswith("xmllm: error:")]) == 1


@pytest.mark.slow
def test_report_size_and_cached_build_rows_come_from_real_files_and_builds(report):
    size = next(r for r in report["rows"] if r["group"] == "report.size")
    assert size["details"]["bytes"] == size["ours"] > 100_000  # inline Bokeh alone is more
    assert size["details"]["explainers"] + len(size["details"]["skipped"]) == len(sample_explainers())
    assert size["details"]["skipped"] == ["training.compare"]  # a model folder has no early checkpoint
    assert size["value"] == pytest.approx(size["ours"] / (3 * 2**20))
    build = next(r for r in report["rows"] if r["group"] == "build.cached")
    assert build["details"]["fresh_cache_misses"] > 0 and build["details"]["second_cache_misses"] == 0
    assert build["ours"] < build["reference"]
    fresh = next(r for r in report["rows"] if r["group"] == "build.fresh")  # the first build, cold cache
    assert fresh["ours"] == pytest.approx(build["reference"]) and fresh["reference"] == 60.0
    assert fresh["value"] == pytest.approx(fresh["ours"] / 60.0) and fresh["details"]["steps_seconds"]
