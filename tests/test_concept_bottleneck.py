"""Concept probes and concept interventions, checked against the ground truth and by hand.

Cell labels are compared with block means of the demo world's own object masks on the demo
model's 8 x 8 grid of 16-pixel patches; a probe must beat the same probe fitted on shuffled labels;
an edit must move the decoder's input by exactly its delta, and an edit of strength 0 must leave
every answer as the plain model gives it.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch


from loaded_models import tiny_loaded

from xmllm.explainers.answering import generate_answer
from xmllm.explainers.prepared import ExplainSample
from xmllm.explainers.demo import DEMO_MODEL_DIR
from xmllm.explainers.demo.model import PATCH_SIZE, build_model, build_processor
from xmllm.explainers.demo.samples import generate_samples, to_explain_sample
from xmllm.explainers.demo.world import Scene
from xmllm.explainers.explanation import Explanation
from xmllm.explainers.methods.design import (
    ConceptBottleneck,
    DecoderInputEdit,
    cell_coverage,
    concept_step,
    edited_decoder_input,
    fit_probe,
    labelled_cells,
    object_masks,
)
from xmllm.explainers.models import LoadedModel, adapter_for, load_model
from xmllm.explainers.models.layout import PatchGrid
from xmllm.explainers.registry import get_explainer

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

ANSWER_TOKENS = 2


@pytest.fixture(scope="module")
def demo_random() -> LoadedModel:
    processor = build_processor()
    model = build_model(processor.tokenizer).eval()
    return LoadedModel(model, processor, adapter_for(model, processor), spec="demo-random", source="build_model",
                       device=torch.device("cpu"), dtype=torch.float32)


def samples(n: int, seed: int, question_types: list[str] | None = None) -> list[ExplainSample]:
    return [to_explain_sample(s) for s in generate_samples(n, seed, question_types=question_types)]


def test_registered_as_a_dataset_explainer_with_citations():
    cls = get_explainer("design.concept_bottleneck")
    assert cls.scope == "dataset" and "2007.04612" in {c.arxiv for c in cls.citations}


def test_cell_coverage_is_the_block_mean_of_the_mask():
    rng = np.random.default_rng(0)
    mask = rng.random((2, 128, 128)) < 0.3
    grid = PatchGrid("image", 8, 8, torch.arange(64))
    np.testing.assert_allclose(cell_coverage(mask, grid), mask.reshape(2, 8, 16, 8, 16).mean(axis=(2, 4)))
    middle = PatchGrid("crop", 8, 4, torch.arange(32), region=(0.0, 0.25, 1.0, 0.75))  # columns 32..95
    np.testing.assert_allclose(cell_coverage(mask, middle),
                               mask[:, :, 32:96].reshape(2, 8, 16, 4, 16).mean(axis=(2, 4)))
    assert cell_coverage(mask, PatchGrid("unplaced", 8, 8, torch.arange(64), region=None)) is None


def test_labelled_cells_follow_the_demo_worlds_masks(demo_random):
    sample = samples(1, 4)[0]
    inputs, _ = demo_random.adapter.build_inputs(sample.images, sample.question)
    layout = demo_random.adapter.image_layouts(inputs)[0]
    masks = object_masks(sample.extra["objects"], 128, 128)
    np.testing.assert_array_equal(masks, Scene.from_json(sample.extra["objects"]).object_masks())
    cells, touched = labelled_cells(layout, masks, 0, 0.5)
    side = 128 // PATCH_SIZE
    shares = masks.reshape(len(masks), side, PATCH_SIZE, side, PATCH_SIZE).mean(axis=(2, 4))
    grid = layout.main_grid
    assert cells
    for cell in cells:
        assert cell.position == int(grid.positions[cell.row * side + cell.col])
        if cell.object is None:
            assert shares[:, cell.row, cell.col].max() == 0
        else:
            assert shares[cell.object, cell.row, cell.col] >= 0.5
    for k, by_position in touched.items():
        assert len(by_position) == int((shares[k] > 0).sum())


def test_concept_step_mirrors_the_probes_margin():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(3, 6)) * 3
    x = np.concatenate([centres[k] + rng.normal(size=(40, 6)) for k in range(3)])
    y = np.repeat(np.array(["red", "green", "blue"]), 40)
    probe = fit_probe("projector", "colour", x, y, x, y, seed=0)
    assert probe.accuracy > 0.9
    reds = x[y == "red"]
    step = concept_step(probe, reds, "red", "blue")
    a, b = probe.classes.index("red"), probe.classes.index("blue")
    before = probe.logits(reds)
    after = probe.logits(reds + step)
    gap_before, gap_after = before[:, b] - before[:, a], after[:, b] - after[:, a]
    mirrored = gap_before < 0
    np.testing.assert_allclose(gap_after[mirrored], -gap_before[mirrored], rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(step[~mirrored], 0.0)
    np.testing.assert_array_equal(probe.logits(reds + 0.0 * step), before)


def test_probe_reads_colour_from_a_random_model_but_not_from_shuffled_labels(demo_random):
    """Random CLIP features still carry a patch's colour linearly; shuffled labels carry nothing."""
    exp = ConceptBottleneck().explain(demo_random, samples(24, 6, ["colour", "shape"]), concepts=["colour", "object"],
                                      intervene=False)
    assert exp.axes["probe_accuracy"] == ("site", "concept")
    assert exp.meta["axis_labels"]["concept"] == ["colour", "object"]
    for site in ("projector", "vision"):
        probe = exp.meta["probes"][f"{site}.colour"]
        assert probe["test_cells"] >= 15 and probe["classes"] == sorted(probe["classes"])
        assert probe["accuracy"] >= 0.7, probe
        assert probe["shuffled_accuracy"] <= probe["accuracy"] - 0.3, probe
    assert exp.scores["interventions"] == 0.0
    assert set(exp.meta["split"]["test"]).isdisjoint(exp.meta["split"]["train"])


def test_edit_moves_the_decoder_input_by_exactly_delta(demo_random):
    sample = samples(1, 8)[0]
    inputs, _ = demo_random.adapter.build_inputs(sample.images, sample.question)
    positions = demo_random.adapter.image_layouts(inputs)[0].main_grid.positions[[3, 10]]
    delta = torch.randn(2, demo_random.model.config.text_config.hidden_size)
    seen: list[torch.Tensor] = []
    block = demo_random.adapter.decoder_layers()[0]

    def capture(_module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    with torch.no_grad():
        handle = block.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            demo_random.model(**inputs)
            with edited_decoder_input(demo_random.adapter, DecoderInputEdit(positions, delta)):
                handle.remove()  # re-register after the edit so that it sees the edited input
                handle = block.register_forward_pre_hook(capture, with_kwargs=True)
                demo_random.model(**inputs)
        finally:
            handle.remove()
    difference = seen[1][0] - seen[0][0]
    torch.testing.assert_close(difference[positions], delta, atol=1e-6, rtol=0)
    others = torch.ones(difference.shape[0], dtype=torch.bool)
    others[positions] = False
    assert torch.equal(difference[others], torch.zeros_like(difference[others]))


def test_alpha_zero_leaves_every_answer_unchanged(demo_random):
    batch = samples(6, 9, ["colour", "shape"])
    exp = ConceptBottleneck().explain(demo_random, batch, concepts=["colour", "shape"], sites=["projector"],
                                      alphas=[0.0], max_new_tokens=ANSWER_TOKENS)
    records = exp.meta["interventions"]
    assert records, exp.meta["not_edited"]
    by_id = {s.id: s for s in batch}
    for record in records:
        plain = generate_answer(demo_random, by_id[record["id"]].images, by_id[record["id"]].question,
                                ANSWER_TOKENS).text
        assert record["answer"] == plain
        assert record["edited"]["0"] == plain and record["control"]["0"] == plain
        assert record["target"] != record["true"] and record["target"] != record["answer"]
    assert exp.scores["intervention.changed@0"] == 0.0
    # and below the answers: a zero edit leaves every logit of the forward exactly as it was
    inputs, _ = demo_random.adapter.build_inputs(batch[0].images, batch[0].question)
    positions = demo_random.adapter.image_layouts(inputs)[0].main_grid.positions
    zero = torch.zeros(positions.numel(), demo_random.model.config.text_config.hidden_size)
    with torch.no_grad():
        plain = demo_random.model(**inputs).logits
        with edited_decoder_input(demo_random.adapter, DecoderInputEdit(positions, zero)) as edit:
            edited = demo_random.model(**inputs).logits
    assert edit.applied == 1 and torch.equal(plain, edited)
    assert exp.maps["intervention.success"].shape == (len(exp.meta["axis_labels"]["edit"]), 1)


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl", "idefics3"])
def test_runs_on_tiny_models_of_other_families(family, tmp_path):
    loaded = tiny_loaded(family)
    exp = ConceptBottleneck().explain(loaded, samples(4, 10, ["colour"]), concepts=["colour", "object"],
                                      alphas=[1.0], max_new_tokens=ANSWER_TOKENS)
    exp.save(tmp_path / "concepts")
    back = Explanation.load(tmp_path / "concepts")
    assert back.meta == exp.meta and back.scores == exp.scores and back.axes == exp.axes
    assert exp.scores["cells"] > 0
    assert exp.maps["probe_accuracy"].shape == (2, len(exp.meta["axis_labels"]["concept"]))
    assert exp.scores["interventions"] >= 1
    for record in exp.meta["interventions"]:
        assert record["concept"] == "colour" and record["cells"] >= 1


def test_bad_input_is_a_one_line_error(demo_random):
    bare = ExplainSample(samples(1, 3)[0].images, "What colour is the circle?", id="bare")
    with pytest.raises(ValueError, match=r"sample 'bare' has no extra\['objects'\]"):
        ConceptBottleneck().explain(demo_random, [bare, bare])
    with pytest.raises(ValueError, match="at least 2 labelled samples"):
        ConceptBottleneck().explain(demo_random, samples(1, 3))
    with pytest.raises(ValueError, match=r"concepts=\['hue'\] must be a list of items, each one of"):
        ConceptBottleneck().explain(demo_random, samples(2, 3), concepts=["hue"])
    with pytest.raises(ValueError, match="alphas"):
        ConceptBottleneck().explain(demo_random, samples(2, 3), alphas=[-1.0])


@pytest.mark.skipif(not (DEMO_MODEL_DIR / "config.json").is_file(), reason="trained demo weights not present")
def test_trained_demo_model_follows_colour_interventions():
    """On the trained demo model the colour probe is near perfect, and moving an object's features
    along it (alpha 1: the probe's margin mirrored) turns most colour answers into the new colour,
    where a random move of the same size does not."""
    loaded = load_model(DEMO_MODEL_DIR, device="cpu", dtype="float32")
    exp = ConceptBottleneck().explain(loaded, samples(20, 21, ["colour"]), concepts=["colour"], sites=["projector"])
    assert exp.meta["probes"]["projector.colour"]["accuracy"] >= 0.9
    assert exp.scores["interventions"] >= 15
    assert exp.scores["intervention.success_rate"] >= 0.7, exp.scores
    assert exp.scores["intervention.control_success_rate"] <= 0.2, exp.scores
