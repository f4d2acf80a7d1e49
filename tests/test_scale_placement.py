"""``xmllm bench --scale``'s sharded and offloaded placements (LLaVA-1.5-13B on 24 GB GPUs), the
weights they place, picking run keys with ``--only`` and merging runs with ``--merge``.

The placements are arithmetic on measured rows; what is checked is that the weights they move add
up to the published architecture's, block by block, and that each placement keeps to its GPU: the
largest offloaded placement that fits, no block more, and shards that split the model."""
from __future__ import annotations

import contextlib
import io
import json
import os

import pytest

from xmllm.bench import scale
from xmllm.bench.scale_configs import CONFIGS, build_processor, parameter_count, skeleton
from xmllm.bench.scale_placement import FILL, GIB, weights_of
from xmllm.cli import main

long_check = pytest.mark.skipif(os.environ.get("XMLLM_LONG_CHECKS") != "1",
                                reason="a long check: .ci/run runs it as its own step (XMLLM_LONG_CHECKS=1)")


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("name", ["llava-1.5-13b", "qwen2-vl-7b", "internvl3.5-8b"])
def test_the_weights_split_into_blocks_and_the_rest_add_up_to_the_published_model(name):
    config = next(c for c in CONFIGS if c.name == name)
    processor = build_processor(config)
    weights = weights_of(config, processor)
    assert weights.total == 2 * parameter_count(config, processor)
    model = skeleton(config, processor)
    one_block = sum(p.numel() for p in model.get_decoder().layers[0].parameters())
    assert weights.block_bytes == 2 * one_block and weights.blocks == config.decoder_layers
    assert weights.head_bytes >= 2 * model.get_output_embeddings().weight.numel()


def test_only_picks_run_keys_by_any_of_its_substrings():
    assert scale.selected("gradient.saliency@recompute", "@recompute")
    assert not scale.selected("gradient.saliency", "@recompute")
    assert scale.selected("lens.logit", "relevancy, lens")
    assert scale.selected("anything", None)
    code, out, err = run_cli("bench", "--scale", "--only", "nothing-like-it,@nowhere")
    assert code == 2 and "matches no sample-level explainer" in err and out == ""


@pytest.fixture(scope="module")
def report_13b():
    """LLaVA-1.5-13B with a forward-only explainer and one that differentiates (its kept and its
    recomputed run), measured as ``xmllm bench --scale`` does."""
    code, out, err = run_cli("bench", "--scale", "--configs", "llava-1.5-13b", "--only", "lens.logit,gradient.saliency",
                             "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.mark.slow
@long_check
def test_13b_is_placed_sharded_over_two_gpus_and_offloaded_on_one(report_13b):
    rows = {r["key"]: r for r in report_13b["rows"]}
    assert set(rows) == {"lens.logit", "gradient.saliency", "gradient.saliency@recompute"}
    assert all(not r["fits"]["24"] for r in rows.values())  # the weights alone are 24.9 GiB
    split = report_13b["models"]["llava-1.5-13b"]["weights_split"]
    block = split["block_bytes"]
    placed = {p["explainer"]: p for p in report_13b["placed"]}
    assert set(placed) == {"lens.logit", "gradient.saliency"}
    assert placed["gradient.saliency"]["offloaded"]["from"] == "gradient.saliency@recompute"
    assert placed["lens.logit"]["offloaded"]["from"] == "lens.logit"
    for key, p in placed.items():
        shards, off = p["sharded"], p["offloaded"]
        assert sum(shards["blocks"]) == 40 and shards["fits"]
        # each shard holds less than the whole model's projected peak, and more than half its weights
        assert all(split["blocks"] * block / 2 < peak < rows[key]["projected_bytes"] for peak in shards["peaks"])
        assert off["fits"] and off["resident_blocks"] + off["offloaded_blocks"] == 40
        assert off["peak"] <= FILL * 24 * GIB < off["peak"] + block  # as many blocks as fit, no more
        assert off["moved_per_pass"] == off["offloaded_blocks"] * block > 0
    # the recomputed run leaves more room for resident blocks than the kept run would
    kept = rows["gradient.saliency"]["projected_bytes"]
    lean = rows["gradient.saliency@recompute"]["projected_bytes"]
    assert lean < kept
    # a recomputed backward is one more pass over the offloaded blocks
    costs = rows["gradient.saliency@recompute"]["costs"]
    assert placed["gradient.saliency"]["offloaded"]["passes"] == pytest.approx(
        costs["forwards"] + costs["recomputed_forwards"], abs=0.01)


@pytest.mark.slow
@long_check
def test_merged_runs_render_the_same_placements_as_markdown(report_13b, tmp_path):
    whole = tmp_path / "a.json"
    whole.write_text(json.dumps(report_13b), encoding="utf-8")
    lens_only = {**report_13b, "rows": [r for r in report_13b["rows"] if r["key"] == "lens.logit"]}
    part = tmp_path / "b.json"
    part.write_text(json.dumps(lens_only), encoding="utf-8")
    code, out, err = run_cli("bench", "--scale", "--merge", str(part), str(whole), "--json")
    assert code == 0, err
    merged = json.loads(out)
    by_explainer = {p["explainer"]: p for p in report_13b["placed"]}
    assert {p["explainer"]: p for p in merged["placed"]} == by_explainer and len(merged["rows"]) == 3
    code, out, err = run_cli("bench", "--scale", "--merge", str(whole), "--markdown")
    assert code == 0, err
    table = out.splitlines()
    assert table[0] == "| explainer | llava-1.5-13b | forward-equivalents (llava-1.5-13b) |"
    assert any(line.startswith("| `gradient.saliency@recompute` |") and "(48)" in line for line in table)
    assert sum(line.startswith("| llava-1.5-13b | `") for line in table) == 2
    elsewhere = tmp_path / "cuda.json"
    elsewhere.write_text(json.dumps({**report_13b, "device": "cuda"}), encoding="utf-8")
    code, out, err = run_cli("bench", "--scale", "--merge", str(whole), str(elsewhere))
    assert code == 2 and "cuda.json: device 'cuda' differs" in err and len(err.strip().splitlines()) == 1


def test_merge_refuses_what_is_not_a_matching_scale_report(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"device": "cpu"}), encoding="utf-8")
    for path, words in ((bad, "bad.json"), (other, "no 'method'"), (tmp_path / "missing.json", "missing.json")):
        code, out, err = run_cli("bench", "--scale", "--merge", str(path))
        assert code == 2 and out == "" and words in err and len(err.strip().splitlines()) == 1
    code, out, err = run_cli("bench", "--merge", str(bad))
    assert code == 2 and "--merge needs --scale" in err
