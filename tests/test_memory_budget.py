"""The run-level memory budget: parsing sizes, the budget in force, and every batching explainer
keeping to it, with the same results as the unchunked run.

Chunked and unchunked runs are compared on a tiny random LLaVA in float32. Where chunks only
regroup the same per-copy arithmetic the results are equal; where a CPU matrix product runs on a
different number of rows its last bits may differ, and the tolerance (float32 rounding of a
log-probability, :data:`ROUNDING`) says so at each comparison.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch


from loaded_models import tiny_loaded
from tiny_models import TEST_IMAGE_SIZES, tiny_image

from xmllm.explainers.answering import generate_answer
from xmllm.explainers.prepared import ExplainSample, prepare
from xmllm.errors import XmllmError
from xmllm.explainers.memory import (
    CPU_BUDGET,
    SAFETY,
    backward_copy_bytes,
    copies_within,
    current_budget,
    default_budget,
    explicit_budget,
    forward_copy_bytes,
    memory_budget,
    parse_memory,
    planning,
    ModelShape,
)
from xmllm.explainers.registry import registered

ROUNDING = dict(rtol=1e-5, atol=1e-5)
"""Float32 log-probabilities of the same copy computed in batches of different sizes agree to a
few units in the last place (the CPU's matrix kernels block their sums by the number of rows)."""
UNLIMITED = 1 << 40
TINY = 1
"""A one-byte budget: every explainer falls back to one copy per forward."""


# --- sizes --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("20GB", 20 * 10**9), ("20 gb", 20 * 10**9), ("24GiB", 24 << 30), ("512MiB", 512 << 20), ("512mib", 512 << 20),
    ("1.5GB", 1_500_000_000), ("1.5e9", 1_500_000_000), ("2000000000", 2_000_000_000), ("64K", 64_000),
    ("3TiB", 3 << 40), ("100B", 100), (4096, 4096), ("  8 GiB ", 8 << 30),
])
def test_parse_memory_reads_decimal_and_binary_units(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "20XB", "-1GB", "0", "twenty", "1e400", "20 G B", True, 0.5])
def test_parse_memory_refuses_with_one_line_naming_the_option(text):
    with pytest.raises(XmllmError) as caught:
        parse_memory(text)
    message = str(caught.value)
    assert message.startswith("--max-memory") and "\n" not in message
    assert isinstance(caught.value, ValueError)  # a bad value, as the API's other parameter errors
    with pytest.raises(XmllmError, match=r"^memory budget"):
        with memory_budget(text if isinstance(text, str) and text else "nope"):
            pass


def test_the_budget_in_force_is_the_innermost_block_else_the_device_default():
    assert explicit_budget() is None
    assert current_budget("cpu") == default_budget("cpu") == CPU_BUDGET
    with memory_budget("2GiB") as outer:
        assert outer == 2 << 30 and current_budget("cpu") == 2 << 30
        with memory_budget(1000) as inner:
            assert inner == 1000 and explicit_budget() == 1000
        with memory_budget(None):  # None inside a block: back to the device default
            assert current_budget("cpu") == CPU_BUDGET
        assert current_budget("cpu") == 2 << 30
    assert explicit_budget() is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_cuda_default_is_a_share_of_the_free_memory():
    free, _ = torch.cuda.mem_get_info()
    assert 0 < default_budget("cuda") < free


def test_copies_within_divides_the_budget_and_keeps_one_copy_at_least():
    with memory_budget(1000):
        assert copies_within(100, "cpu") == int(1000 // (100 * SAFETY))
        assert copies_within(100, "cpu", fixed=500) == int(500 // (100 * SAFETY))
        assert copies_within(100, "cpu", most=3) == 3
        assert copies_within(10_000, "cpu") == 1  # one copy overflows: an explainer still runs one
        assert copies_within(100, "cpu", fixed=2000) == 1
    assert copies_within(1, "cpu") == 32  # the CPU's cap


def test_estimates_grow_with_depth_width_and_eager_attention():
    loaded = tiny_loaded("llava")
    image = tiny_image(*TEST_IMAGE_SIZES["llava"])
    prep = prepare(loaded, ExplainSample([image], "what colour is the square"),
                   answer=generate_answer(loaded, [image], "what colour is the square", max_new_tokens=3))
    shape = ModelShape.of(loaded)
    assert shape.decoder_layers == len(loaded.adapter.decoder_layers()) and shape.vision_tokens(
        prep.inputs["pixel_values"]) > 0
    assert forward_copy_bytes(prep, eager=True) > forward_copy_bytes(prep)
    assert backward_copy_bytes(prep) > forward_copy_bytes(prep)
    with planning(decoder=4 * shape.decoder_layers):  # as the scale bench plans a cut model
        assert ModelShape.of(loaded).decoder_layers == 4 * shape.decoder_layers
        deeper = backward_copy_bytes(prep)
    assert deeper > backward_copy_bytes(prep)


# --- explainers keep to it -----------------------------------------------------------------------------


QUESTION = "what colour is the square"


@pytest.fixture(scope="module")
def prep():
    loaded = tiny_loaded("llava")
    image = tiny_image(*TEST_IMAGE_SIZES["llava"])
    answer = generate_answer(loaded, [image], QUESTION, max_new_tokens=4)
    return prepare(loaded, ExplainSample([image], QUESTION, id="budget"), answer=answer)


class Batches:
    """The batch size of every forward through the first decoder block."""

    def __init__(self, loaded) -> None:
        self.block = loaded.adapter.decoder_layers()[0]
        self.sizes: list[int] = []

    def __enter__(self) -> "Batches":
        def hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            self.sizes.append(int(hidden.shape[0]))

        self.handle = self.block.register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def explain(eid, prep, budget, **params):
    torch.manual_seed(0)
    with memory_budget(budget), Batches(prep.loaded) as batches:
        exp = registered()[eid]().explain(prep.loaded, prep, **params)
    return exp, batches.sizes


BATCHING = {
    "perturbation.occlusion": ({}, "batch_size"),
    "perturbation.text_ablation": ({}, "batch_size"),
    "intervention.attention_knockout": ({}, "batch_size"),
    "intervention.activation_patching": ({"corruption": "noise"}, "batch_size"),
    "neurons.top_activations": ({"top_k": 3, "random_draws": 3}, "batch_size"),
    "tokens.visual_importance": ({"steps": 4}, "batch_size"),
    "gradient.integrated": ({"n_steps": 6, "per_token": False}, "internal_batch_size"),
    "causal.minimal_set": ({}, "batch_size"),
}
"""Explainers that batch copies of the input, the parameters that keep them quick, and the name
under which they record the batch they used."""


@pytest.mark.parametrize("eid", sorted(BATCHING))
def test_a_tiny_budget_runs_one_copy_per_forward_and_an_explicit_batch_still_wins(prep, eid):
    params, recorded = BATCHING[eid]
    wide, wide_sizes = explain(eid, prep, UNLIMITED, **params)
    narrow, narrow_sizes = explain(eid, prep, TINY, **params)
    assert narrow.params[recorded] == 1 < wide.params[recorded]
    assert max(narrow_sizes) == 1 < max(wide_sizes)
    forced, forced_sizes = explain(eid, prep, TINY, **params, **{recorded: 2})
    assert forced.params[recorded] == 2 and max(forced_sizes) == 2


def _maps(exp) -> dict[str, np.ndarray]:
    return {name: np.asarray(value) for name, value in exp.maps.items()}


@pytest.mark.parametrize("eid", sorted(BATCHING))
def test_chunked_results_equal_the_unchunked_run(prep, eid):
    """Every map and score of a one-copy-per-forward run against the one-chunk run, to float32
    rounding of the log-probabilities (:data:`ROUNDING`); integer outputs (ranks, chosen cells,
    which neurons) exactly."""
    params, _ = BATCHING[eid]
    whole, _ = explain(eid, prep, UNLIMITED, **params)
    chunked, _ = explain(eid, prep, TINY, **params)
    assert set(whole.maps) == set(chunked.maps)
    for name, value in _maps(whole).items():
        other = _maps(chunked)[name]
        if np.issubdtype(value.dtype, np.integer):
            np.testing.assert_array_equal(other, value, err_msg=name)
        else:
            np.testing.assert_allclose(other, value, err_msg=name, equal_nan=True, **ROUNDING)
    for name, value in whole.scores.items():
        if name == "forwards":  # what the run cost, not what it found: more, smaller forwards
            assert chunked.scores[name] >= value, name
            continue
        assert chunked.scores[name] == pytest.approx(value, rel=1e-5, abs=1e-5), name


def test_visual_reliance_runs_its_three_images_in_chunks_with_equal_results(prep):
    whole, sizes = explain("inference.visual_reliance", prep, UNLIMITED)
    chunked, chunked_sizes = explain("inference.visual_reliance", prep, TINY)
    assert sizes == [3] and chunked_sizes == [1, 1, 1]
    for name, value in _maps(whole).items():
        np.testing.assert_allclose(_maps(chunked)[name], value, err_msg=name, **ROUNDING)


def test_the_logit_lens_reads_out_in_row_chunks_with_identical_results(prep):
    """The read-out of one row is the same arithmetic whether other rows share its product or not:
    on this model the chunked maps equal the whole ones to float32 rounding."""
    from xmllm.explainers.methods.lens import lens_rows

    with memory_budget(TINY):
        assert lens_rows(prep, 100) == 1
    with memory_budget(UNLIMITED):
        assert lens_rows(prep, 100) == 100
    whole, _ = explain("lens.logit", prep, UNLIMITED)
    chunked, _ = explain("lens.logit", prep, TINY)
    for name, value in _maps(whole).items():
        if np.issubdtype(value.dtype, np.integer):
            np.testing.assert_array_equal(_maps(chunked)[name], value, err_msg=name)
        else:
            np.testing.assert_allclose(_maps(chunked)[name], value, err_msg=name, **ROUNDING)
    assert chunked.meta["image_top_k"] == whole.meta["image_top_k"]


def test_every_sample_level_explainer_runs_under_a_one_byte_budget(prep):
    """No explainer refuses a budget too small for even one copy: it runs one copy at a time."""
    from xmllm.explainers.registry import sample_level_ids

    for eid in sample_level_ids():
        params = {"other": prep.loaded} if eid == "training.compare" else {}
        if eid == "data.counterfactual":
            params = {"rephrasings": ["what is the colour of the square"]}
        if eid == "intervention.activation_patching":
            params = {"corruption": "noise"}
        _, sizes = explain(eid, prep, TINY, **params)
        assert sizes and max(sizes) == 1, eid
