"""``xmllm bench --scale``'s costs: forward-equivalents beside every row's memory, the recomputed run of
each explainer that differentiates, and ``--growth``'s lines (memory and cost against answer length and
image tokens), measured on a narrow LLaVA-shaped configuration so that they run in seconds."""
from __future__ import annotations

import os

import math

import pytest
import torch
from xmllm.bench import scale, scale_costs
from xmllm.bench.scale_configs import ScaleConfig
from xmllm.explainers.scaleplan import recomputed

NARROW = ScaleConfig(
    "narrow-llava", "tests (a LLaVA-1.5 shape at toy widths)", "llava",
    {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 8, "num_attention_heads": 4,
     "num_key_value_heads": 4, "vocab_size": 128, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5},
    {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 2,
     "image_size": 56, "patch_size": 14, "projection_dim": 32},
    {"vision_feature_layer": -2, "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu"},
    {"size": {"shortest_edge": 56}, "crop_size": {"height": 56, "width": 56}},
    (56, 56), 16, "4 x 4 patches")
IDS = ["lens.logit", "gradient.saliency"]

LONG_CHECKS = os.environ.get("XMLLM_LONG_CHECKS") == "1"
long_check = pytest.mark.skipif(not LONG_CHECKS, reason="a long check: .ci/run runs it as its own step (XMLLM_LONG_CHECKS=1)")



@pytest.mark.slow
@long_check
def test_rows_carry_their_cost_and_recomputed_runs_cost_one_forward_more_per_backward():
    keys = scale.run_keys(IDS)
    assert keys == ["lens.logit", "gradient.saliency", "gradient.saliency" + scale.RECOMPUTED]
    assert not scale.differentiates("lens.logit") and scale.differentiates("relevancy.chefer")
    model = scale.describe(NARROW)
    rows = {r["key"]: r for r in scale.measure_config(model, keys, torch.device("cpu"), answer_tokens=4)}
    for row in rows.values():
        assert "error" not in row, row
        assert row["costs"]["forward_equivalents"] > 0 and row["projected_bytes"] > row["weights_bytes"]
    kept, again = rows["gradient.saliency"], rows["gradient.saliency" + scale.RECOMPUTED]
    assert kept["run"] == "default" and again["run"] == "recomputed" and again["explainer"] == "gradient.saliency"
    assert again["costs"] == recomputed(kept["costs"])
    assert again["costs"]["forward_equivalents"] == pytest.approx(
        kept["costs"]["forward_equivalents"] + kept["costs"]["backwards"])
    report = {"device": "cpu", "method": scale.FREE, "answer_tokens": 4,
              "depths": list(scale.DEPTHS), "vision_blocks": [scale.VISION_BASE, scale.VISION_STEP],
              "gpus_gib": list(scale.GPUS), "rows": list(rows.values()), "seconds": 0.0, "threads": 1,
              "models": {NARROW.name: {"source": NARROW.source, "parameters": model.parameters,
                                       "weights_bytes": model.weights, "decoder_layers": 8, "vision_layers": 4,
                                       "measured_on_gpu_gib": model.gpu, "budget_bytes": model.budget}}}
    text = scale.render(report)
    assert "gradient.saliency@recompute" in text
    assert f"x{kept['costs']['forward_equivalents']:g}" in text


def test_a_default_run_that_recomputes_by_itself_is_costed_as_recomputed():
    """recompute='auto' turns recomputation on where the kept backward does not fit the budget (the
    growth run's long answers on LLaVA-1.5-7B): the default row then counts the extra forwards."""
    keys = ["gradient.saliency", "gradient.saliency" + scale.RECOMPUTED]
    roomy, tight = scale.describe(NARROW), scale.describe(NARROW)
    tight.budget = 1 << 16  # 64 KiB: no kept backward fits
    for model, auto in ((roomy, False), (tight, True)):
        rows = {r["key"]: r for r in scale.measure_config(model, keys, torch.device("cpu"), answer_tokens=2)}
        kept, again = rows["gradient.saliency"], rows["gradient.saliency" + scale.RECOMPUTED]
        assert kept["auto_recompute"] is auto and again["auto_recompute"] is False
        assert again["costs"] == recomputed(kept["kept_costs"])
        if auto:
            assert kept["costs"] == {**again["costs"], "recomputed": True}
            assert scale._cost(kept).endswith("*")
        else:
            assert kept["costs"] == kept["kept_costs"] and not scale._cost(kept).endswith("*")


def test_a_recomputed_run_counts_the_bytes_of_real_arithmetic():
    """The recomputed run's forward runs again inside the backward: measured as ``measure_one`` measures
    (free arithmetic, the recomputation answered as a forward), the peak equals real arithmetic's."""
    from xmllm.bench.free_compute import measure
    from xmllm.bench.scale_configs import bench_image, build
    from xmllm.explainers.registry import registered

    model = scale.describe(NARROW)
    peaks = []
    for values, free in (("random", False), ("free", True)):
        loaded = build(NARROW, 2, 2, processor=model.processor, values=values)
        prep = scale.forced(loaded, bench_image(NARROW), 4)

        def run(loaded=loaded, prep=prep):
            return registered()["gradient.saliency"]().explain(loaded, prep, recompute=True)

        result, peak = measure(run) if free else measure(run, free=False)
        assert not isinstance(result, Exception), result
        peaks.append(peak)
    assert peaks[0] == peaks[1] > 0


@pytest.mark.slow
@long_check
def test_growth_fits_one_line_per_run_with_finite_slopes():
    ids = ["gradient.saliency"]  # a kept and a recomputed line (lens.logit's is the other tests')
    report = scale_costs.run_growth(NARROW, ids=ids, answer_lengths=(2, 4, 8), image_sides=(28, 42, 56))
    assert report["image_tokens"] == [4, 9, 16]
    assert [line["key"] for line in report["lines"]] == scale.run_keys(ids)
    for line in report["lines"]:
        assert "error" not in line, line
        for axis in ("answer", "image"):
            for fit in (line[axis]["memory_fit"], line[axis]["cost_fit"]):
                assert math.isfinite(fit["slope"]) and math.isfinite(fit["intercept"])
        assert line["image"]["memory_fit"]["slope"] > 0  # more image tokens, more memory
        assert line["description"]["projected_bytes"] > report["weights_bytes"]
    saliency = {line["key"]: line for line in report["lines"]}["gradient.saliency"]
    assert saliency["answer"]["cost_fit"]["slope"] > 0  # one backward per answer token
    text = scale_costs.render_growth(report)
    assert all(key in text for key in scale.run_keys(ids))
    table = scale_costs.description_table(report)
    assert table.count("\n") == 2 and "`gradient.saliency`" in table


def test_growth_refuses_a_family_it_cannot_resize():
    from xmllm.bench.scale_configs import CONFIGS

    with pytest.raises(ValueError, match="qwen2_vl"):
        scale_costs.resized(next(c for c in CONFIGS if c.model_type == "qwen2_vl"), 672)
