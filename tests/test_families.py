"""Every family of the tiny-model matrix, checked without trusting its adapter.

Per family: the image positions are exactly the image tokens, their count is the count of
features the model computes, and (vision attention switched off) the pixels of a cell change the
decoder's inputs at that cell's position and nowhere else. The default suite runs a fast subset of
explainers on each family; ``XMLLM_FAMILY_MATRIX=1`` runs all sample-level explainers (the CI's
own step). Whatever an explainer cannot do on a family must be a declared refusal with a reason.
"""
from __future__ import annotations

import os

import pytest
import torch
from feature_positions import feature_positions
from loaded_models import TINY_QUESTION, tiny_loaded, tiny_prepared
from tiny_models import ALL_FAMILIES, NEW_FAMILIES, TEST_IMAGE_SIZES, build_tiny, tiny_image

from xmllm.explainers.models import AdapterError, adapter_for
from xmllm.explainers.models.adapters.generic import GenericAdapter
from xmllm.explainers.models.adapters.llava import LlavaAdapter
from xmllm.explainers.models.cell_check import check_cell_positions
from xmllm.explainers.registry import sample_level_ids
from xmllm.pipeline import make_plan, run_plan

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

FAST_SUBSET = ("attention.rollout", "gradient.saliency", "perturbation.occlusion", "lens.logit")
"""One explainer of each kind of model access: attention weights, a backward pass, masked forwards,
the residual stream; the whole matrix runs with XMLLM_FAMILY_MATRIX=1."""
FULL_MATRIX = os.environ.get("XMLLM_FAMILY_MATRIX") == "1"


@pytest.fixture(params=ALL_FAMILIES)
def family(request) -> str:
    return request.param


def _inputs(family: str):
    loaded = tiny_loaded(family)
    inputs, _ = loaded.adapter.build_inputs([tiny_image(*TEST_IMAGE_SIZES[family])], TINY_QUESTION)
    return loaded, inputs


def test_positions_are_the_image_tokens_and_count_the_models_features(family):
    """In the sequence: the image tokens. Through cross-attention (Mllama): one position per
    cross-attended token after the sequence, the image token of the sequence its marker."""
    loaded, inputs = _inputs(family)
    adapter = loaded.adapter
    (layout,) = adapter.image_layouts(inputs)
    positions, features = feature_positions(loaded, inputs)
    assert torch.equal(layout.all_positions, positions)
    assert features == positions.numel() == layout.num_tokens
    if adapter.reads_image_through == "cross_attention":
        assert adapter.position_count(inputs) == int(positions.max()) + 1
        assert torch.equal(layout.marker_positions, torch.nonzero(inputs["input_ids"][0] == adapter.image_token_id)[0])


def test_a_cells_pixels_reach_the_decoder_at_its_position_only(family):
    loaded, inputs = _inputs(family)
    if loaded.adapter.lacks("pixel_cells"):
        pytest.skip(loaded.adapter.lacks("pixel_cells"))
    assert check_cell_positions(loaded.adapter, inputs) == []


def test_the_check_catches_a_transposed_map():
    """The check is not satisfied by any map: LLaVA's with rows and columns swapped fails it."""

    class Transposed(LlavaAdapter):
        def pixel_cell_map(self, inputs):
            cells = super().pixel_cell_map(inputs)
            return cells.transpose(-1, -2).contiguous()

    model, processor = build_tiny("llava")
    adapter = Transposed(model, processor)
    inputs, _ = adapter.build_inputs([tiny_image(32, 32)], TINY_QUESTION)
    mismatches = check_cell_positions(adapter, inputs)
    assert mismatches and all(m.changed != (m.position,) for m in mismatches)


def test_new_families_are_served_by_an_adapter_that_checks_itself():
    """Families added since the first eight get their own adapter or the generic one, never a refusal."""
    for family in NEW_FAMILIES:
        model, processor = build_tiny(family)
        adapter = adapter_for(model, processor)
        assert adapter.kind in ("own", "generic"), family


def test_the_generic_adapter_refuses_in_one_line_what_it_cannot_derive():
    model, processor = build_tiny("llava_next")  # tiles + a base view: not one vision input per image
    adapter = GenericAdapter(model, processor)
    inputs, _ = adapter.build_inputs([tiny_image(*TEST_IMAGE_SIZES["llava_next"])], TINY_QUESTION)
    with pytest.raises(AdapterError) as error:
        adapter.image_layouts(inputs)
    message = str(error.value)
    assert "\n" not in message and message.startswith("llava_next:") and "pixel_values of shape" in message


def test_an_image_token_left_unset_in_the_config_is_taken_from_the_processor():
    """MiniCPM-V's config class declares image_token_id with a default of None (the checkpoint sets
    it): not a refusal by itself; the adapter takes the processor's, and refuses in one line when
    neither names one."""
    from xmllm.explainers.models.adapters.generic import generic_refusal

    model, processor = build_tiny("minicpmv4_6")
    model.config.image_token_id = None
    assert generic_refusal(model.config) is None
    assert GenericAdapter(model, processor).image_token_id == processor.image_token_id
    model.config.image_token_id = None
    processor.image_token_id = None
    processor.image_token = processor.tokenizer.image_token = "<not-a-token>"
    with pytest.raises(AdapterError) as error:
        GenericAdapter(model, processor)
    assert str(error.value) == "minicpmv4_6: no image token id in its config or processor"


def test_explainers_run_or_refuse_with_a_reason(family):
    ids = sample_level_ids() if FULL_MATRIX else list(FAST_SUBSET)
    loaded = tiny_loaded(family)
    prepared = tiny_prepared(family, TINY_QUESTION, tokens=2)
    plan = make_plan([i for i in ids if i != "training.compare" and i != "intervention.activation_patching"])
    refusals = plan.refusals(loaded, prepared.sample)
    ran = 0
    for outcome in run_plan(loaded, prepared, plan, skip=refusals):
        if outcome.skipped is not None:
            assert outcome.skipped.strip() and "\n" not in outcome.skipped
            continue
        explanation = outcome.explanation
        assert explanation is not None, outcome.label
        for name, array in explanation.maps.items():
            values = torch.as_tensor(array)
            if values.is_floating_point() and values.numel():
                # NaN marks "not measured" where an explainer documents it (text ablation's unablated tokens)
                assert not bool(torch.isinf(values).any()), (family, outcome.label, name)
                assert not bool(torch.isnan(values).all()), (family, outcome.label, name)
        ran += 1
    assert ran >= 1


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "paligemma", "gemma3"])
def test_the_generic_adapter_derives_what_the_own_adapter_knows(family):
    """Where one vision input per image or image_grid_thw suffices, the generic adapter's grids and
    pixel map equal the family adapter's (derived, not told)."""
    model, processor = build_tiny(family)
    own, generic = adapter_for(model, processor), GenericAdapter(model, processor)
    assert own.kind == "own" and generic.kind == "generic"
    inputs, _ = own.build_inputs([tiny_image(*TEST_IMAGE_SIZES[family])], TINY_QUESTION)

    def grids(adapter):
        return [(g.rows, g.cols, g.positions.tolist()) for layout in adapter.image_layouts(inputs) for g in layout.grids]

    assert grids(generic) == grids(own)
    assert torch.equal(generic.pixel_cell_map(inputs), own.pixel_cell_map(inputs))
    assert check_cell_positions(generic, inputs) == []
