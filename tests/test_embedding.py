"""embedding.probe and embedding.projection on real forwards of the demo architecture and of
tiny models of several families, with every reference computed independently: hidden states
from ``output_hidden_states``, projections from numpy's SVD and scikit-learn's PCA, object cells
from the geometry of the object's box.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch


from tiny_models import build_tiny, missing_dependency

from xmllm.explainers.demo.model import PATCH_SIZE, build_model, build_processor
from xmllm.explainers.demo.samples import generate_samples, make_pair, to_explain_sample
from xmllm.explainers.explanation import Explanation
from xmllm.explainers.methods.embedding import (
    ATTRIBUTES,
    COL_LABELS,
    ROW_LABELS,
    control_labels,
    fit_probe,
    modality_gap,
    object_attributes,
    pca,
    position_coverage,
    prompt_states,
    sample_groups,
    split_groups,
    unit_rows,
)
from xmllm.explainers.backward import default_cam_layer
from xmllm.explainers.models import LoadedModel, adapter_for
from xmllm.explainers.registry import Need, get_explainer, registered

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

PROBE_FAMILIES = ("llava", "qwen2_vl", "idefics3", "gemma3")
"""One plain grid, one merged dynamic-resolution grid, tiles plus a global view, a pooled grid."""


def loaded_from(model, processor, name: str) -> LoadedModel:
    return LoadedModel(model.eval(), processor, adapter_for(model, processor), name, "tests",
                       torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def demo() -> LoadedModel:
    """The demo architecture with random weights (real forwards, nothing trained)."""
    processor = build_processor()
    return loaded_from(build_model(processor.tokenizer), processor, "demo-random")


@pytest.fixture(scope="module")
def demo_set():
    return [to_explain_sample(s) for s in generate_samples(30, seed=11)]


@pytest.fixture(scope="module")
def demo_probe(demo, demo_set) -> Explanation:
    return get_explainer("embedding.probe")().explain(demo, demo_set, seed=3)


_TINY: dict[str, LoadedModel] = {}


def tiny(family: str) -> LoadedModel:
    package = missing_dependency(family)
    if package:
        pytest.skip(f"the {family} processor needs {package}, which is not installed")
    if family not in _TINY:
        _TINY[family] = loaded_from(*build_tiny(family), f"tiny-{family}")
    return _TINY[family]


# --- the probe itself ---------------------------------------------------------------------------------


def test_probe_reads_a_label_the_features_carry_and_its_control_does_not():
    rng = np.random.default_rng(0)
    labels = np.asarray(["red", "green", "blue", "yellow"])[rng.integers(0, 4, 240)]
    onehot = (labels[:, None] == np.asarray(["red", "green", "blue", "yellow"])[None]).astype(float)
    features = np.concatenate([onehot + 0.1 * rng.normal(size=onehot.shape), rng.normal(size=(240, 28))], axis=1)
    test = split_groups(240, 0.3, seed=5)
    carried = fit_probe(features, labels, test, seed=5)
    assert carried.accuracy >= 0.98
    assert carried.control_accuracy < 0.45  # four classes: chance is about 0.25
    assert carried.n_test == int(test.sum()) and carried.classes == ("blue", "green", "red", "yellow")
    blind = fit_probe(rng.normal(size=(240, 32)), labels, test, seed=5)
    assert blind.accuracy < 0.45  # features without the label: the probe cannot find it
    # features that carry the control's shuffled labels: now the control reads them and the probe cannot
    shuffled = control_labels(labels, seed=5)
    assert sorted(shuffled) == sorted(labels) and (shuffled != labels).mean() > 0.5
    onehot = (shuffled[:, None] == np.asarray(["red", "green", "blue", "yellow"])[None]).astype(float)
    inverted = fit_probe(onehot + 0.1 * rng.normal(size=onehot.shape), labels, test, seed=5)
    assert inverted.control_accuracy >= 0.98 and inverted.accuracy < 0.45


def test_split_is_fixed_by_the_seed_and_keeps_pairs_together(demo_set):
    assert np.array_equal(split_groups(40, 0.3, 1), split_groups(40, 0.3, 1))
    assert not np.array_equal(split_groups(40, 0.3, 1), split_groups(40, 0.3, 2))
    assert split_groups(40, 0.3, 1).sum() == 12
    base = generate_samples(4, seed=2)
    partner = make_pair(base[0], 2)
    samples = [to_explain_sample(s) for s in (*base, partner)]
    groups = sample_groups(samples)
    assert groups.tolist() == [0, 1, 2, 3, 0]
    with pytest.raises(ValueError, match="at least 2 independent samples"):
        split_groups(1, 0.3, 0)


def test_position_labels_are_the_third_of_the_image_holding_the_centre():
    obj = {"shape": "circle", "colour": "red", "cx": 100.0, "cy": 10.0, "size": 20.0}
    assert object_attributes(obj, 128, 128) == {"colour": "red", "shape": "circle", "row": ROW_LABELS[0],
                                                "col": COL_LABELS[2]}
    assert object_attributes({**obj, "cx": 64.0, "cy": 127.9}, 128, 128)["row"] == ROW_LABELS[2]
    assert object_attributes({**obj, "cx": 64.0, "cy": 127.9}, 128, 128)["col"] == COL_LABELS[1]


# --- where objects lie ----------------------------------------------------------------------------------


def test_object_coverage_on_the_demo_grid_matches_box_geometry(demo, demo_set):
    """On the demo's 8 x 8 grid of 16-pixel cells, a cell's coverage is the box's overlap area."""
    sample = demo_set[0]
    inputs, _ = demo.adapter.build_inputs(sample.images, sample.question)
    objects = sample.extra["objects"]
    cover = position_coverage(demo.adapter, inputs, sample.images[0], sample.question, objects)
    grid = demo.adapter.image_layouts(inputs)[0].main_grid
    for k, obj in enumerate(objects):
        half = obj["size"] / 2
        x0, x1, y0, y1 = obj["cx"] - half, obj["cx"] + half, obj["cy"] - half, obj["cy"] + half
        expected = np.zeros((grid.rows, grid.cols))
        for r in range(grid.rows):
            for c in range(grid.cols):
                dy = max(0.0, min(y1, (r + 1) * PATCH_SIZE) - max(y0, r * PATCH_SIZE))
                dx = max(0.0, min(x1, (c + 1) * PATCH_SIZE) - max(x0, c * PATCH_SIZE))
                expected[r, c] = dx * dy / PATCH_SIZE**2
        got = grid.gather(cover[k]).numpy()
        assert np.abs(got - expected).max() < 0.1, obj  # PIL rasterises to whole pixels
        outside = torch.ones(cover.shape[1], dtype=torch.bool)
        outside[grid.positions] = False
        assert float(cover[k][outside].abs().max()) == 0.0  # only image cells are covered


@pytest.mark.parametrize("family", PROBE_FAMILIES)
def test_object_coverage_peaks_on_the_cell_holding_the_centre(family, demo_set):
    loaded = tiny(family)
    for sample in demo_set[:3]:
        inputs, _ = loaded.adapter.build_inputs(sample.images, sample.question)
        cover = position_coverage(loaded.adapter, inputs, sample.images[0], sample.question, sample.extra["objects"])
        grid = loaded.adapter.image_layouts(inputs)[0].main_grid
        top, left, bottom, right = grid.region
        for k, obj in enumerate(sample.extra["objects"]):
            cells = grid.gather(cover[k]).numpy()
            fy = (obj["cy"] / sample.images[0].height - top) / (bottom - top)
            fx = (obj["cx"] / sample.images[0].width - left) / (right - left)
            centre = (min(int(fy * grid.rows), grid.rows - 1), min(int(fx * grid.cols), grid.cols - 1))
            peak = np.unravel_index(np.argmax(cells), cells.shape)
            assert abs(peak[0] - centre[0]) <= 1 and abs(peak[1] - centre[1]) <= 1, (family, obj, peak, centre)
            assert cells[centre] > 0.0


# --- hidden states at every site -----------------------------------------------------------------------


def test_prompt_states_are_the_models_own_hidden_states(demo, demo_set):
    sample = demo_set[1]
    states = prompt_states(demo, sample)
    inputs, _ = demo.adapter.build_inputs(sample.images, sample.question)
    with torch.no_grad():
        out = demo.model(**inputs, output_hidden_states=True)
        image_features = demo.model.model.get_image_features(pixel_values=inputs["pixel_values"])
        tower = demo.adapter.vision_tower(inputs["pixel_values"], output_hidden_states=True)
    hidden = out.hidden_states
    assert torch.allclose(states.decoder_input, hidden[0][0], atol=1e-6)
    for i in range(len(states.blocks) - 1):  # the last entry of hidden_states is after the final norm
        assert torch.allclose(states.blocks[i], hidden[i + 1][0], atol=1e-5)
    features = image_features.pooler_output if hasattr(image_features, "pooler_output") else image_features
    features = torch.cat(list(features)) if isinstance(features, (list, tuple)) else features
    assert torch.allclose(states.decoder_input[states.image_positions], features.reshape(-1, features.shape[-1]),
                          atol=1e-5)
    layer = default_cam_layer(demo.adapter)
    assert torch.allclose(states.vision, tower.hidden_states[layer + 1].reshape(-1, states.vision.shape[-1]),
                          atol=1e-5)


# --- the probe explainer ----------------------------------------------------------------------------------


def test_probe_on_the_demo_architecture(demo_probe, demo_set, tmp_path):
    exp = demo_probe
    cls = get_explainer("embedding.probe")
    assert cls.scope == "dataset" and Need.LABELLED_SET in cls.needs
    assert all(c.arxiv for c in cls.citations)
    sites = exp.meta["sites"]
    assert sites == ["vision", "projector", "decoder.0", "decoder.1", "decoder.2", "decoder.3"]
    assert exp.meta["attributes"] == list(ATTRIBUTES)
    assert exp.axes["accuracy"] == ("attribute", "site") and exp.maps["accuracy"].shape == (6, 6)
    acc, ctl = exp.maps["accuracy"], exp.maps["control_accuracy"]
    text = [exp.meta["attributes"].index(a) for a in ("count", "question_type")]
    assert np.isnan(acc[text][:, :2]).all() and np.isfinite(acc[text][:, 2:]).all()
    assert np.isfinite(acc[:4]).all() and np.isfinite(ctl[:4]).all()
    assert exp.meta["objects"] == sum(len(s.extra["objects"]) for s in demo_set) - len(exp.meta["skipped_objects"])
    # random weights still pass colour through a linear patch embedding: the probe finds it,
    # its shuffled control does not
    colour = exp.meta["attributes"].index("colour")
    assert acc[colour, 0] >= 0.8
    assert ctl[colour, 0] <= 0.5
    assert exp.scores["colour.best_accuracy"] >= 0.8
    np.testing.assert_allclose(exp.maps["selectivity"], acc - ctl)
    exp.save(tmp_path / "probe")
    back = Explanation.load(tmp_path / "probe")
    assert back.axes == exp.axes and back.meta["sites"] == sites
    np.testing.assert_array_equal(back.maps["accuracy"], acc)


def test_probe_is_reproducible_and_checks_its_input():
    loaded = tiny("llava")
    samples = [to_explain_sample(s) for s in generate_samples(8, seed=4)]
    probe = get_explainer("embedding.probe")()
    first = probe.explain(loaded, samples, seed=1, attributes=["colour", "count"])
    again = probe.explain(loaded, samples, seed=1, attributes=["colour", "count"])
    np.testing.assert_array_equal(first.maps["accuracy"], again.maps["accuracy"])
    np.testing.assert_array_equal(first.maps["control_accuracy"], again.maps["control_accuracy"])
    assert first.meta["test_samples"] == again.meta["test_samples"]
    bare = [to_explain_sample(s) for s in generate_samples(3, seed=4)]
    bare[1].extra.pop("objects")
    with pytest.raises(ValueError, match=r"sample 's4-00001' has no extra\['objects'\]") as err:
        probe.explain(loaded, bare)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="attributes"):
        probe.explain(loaded, samples, attributes=["weight"])
    with pytest.raises(ValueError, match="dataset-scope"):
        probe.explain(loaded, samples[0].question)


@pytest.mark.parametrize("family", PROBE_FAMILIES)
def test_probe_runs_on_every_family(family):
    loaded = tiny(family)
    samples = [to_explain_sample(s) for s in generate_samples(8, seed=6)]
    exp = get_explainer("embedding.probe")().explain(loaded, samples, attributes=["colour", "row", "count"])
    layers = len(loaded.adapter.decoder_layers())
    assert exp.maps["accuracy"].shape == (3, 2 + layers)
    assert np.isfinite(exp.maps["accuracy"][:2]).all()
    assert np.isnan(exp.maps["accuracy"][2, :2]).all() and np.isfinite(exp.maps["accuracy"][2, 2:]).all()
    assert ((exp.maps["accuracy"][np.isfinite(exp.maps["accuracy"])] >= 0) & (exp.maps["accuracy"][
        np.isfinite(exp.maps["accuracy"])] <= 1)).all()
    assert exp.meta["objects"] > 0 and not exp.meta["skipped_objects"]


# --- projections and the modality gap -------------------------------------------------------------------


def test_pca_matches_numpy_svd_and_scikit_learn():
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(1)
    points = rng.normal(size=(50, 6)) @ rng.normal(size=(6, 6)) + 3.0
    coords, axes, ratios = pca(points)
    centred = points - points.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    for k in range(2):
        sign = np.sign(vt[k] @ axes[k])
        np.testing.assert_allclose(axes[k], sign * vt[k], atol=1e-10)
        np.testing.assert_allclose(coords[:, k], sign * centred @ vt[k], atol=1e-9)
        assert axes[k][np.argmax(np.abs(axes[k]))] > 0  # the fixed sign
    np.testing.assert_allclose(ratios, (s**2 / (s**2).sum())[:2], atol=1e-12)
    reference = PCA(n_components=2).fit(points)
    np.testing.assert_allclose(np.abs(coords), np.abs(reference.transform(points)), atol=1e-8)
    np.testing.assert_allclose(ratios, reference.explained_variance_ratio_, atol=1e-12)
    flat, _, flat_ratios = pca(np.ones((5, 1)))
    assert flat.shape == (5, 2) and not flat.any() and not flat_ratios.any()


def test_modality_gap_is_zero_for_identical_distributions_and_grows_apart():
    rng = np.random.default_rng(2)
    a, b = torch.as_tensor(rng.normal(size=(4000, 16))), torch.as_tensor(rng.normal(size=(4000, 16)))
    same = modality_gap(unit_rows(a).sum(0).numpy(), 4000, unit_rows(a).sum(0).numpy(), 4000)
    assert same == 0.0
    drawn_twice = modality_gap(unit_rows(a).sum(0).numpy(), 4000, unit_rows(b).sum(0).numpy(), 4000)
    assert drawn_twice < 0.05
    shifted = modality_gap(unit_rows(a).sum(0).numpy(), 4000, unit_rows(b + 3.0).sum(0).numpy(), 4000)
    assert shifted > 0.9


def test_projection_is_pca_of_the_models_hidden_states(demo, demo_set, tmp_path):
    samples = demo_set[:4]
    exp = get_explainer("embedding.projection")().explain(demo, samples, image_points=10, text_points=6, seed=2)
    layers = exp.meta["layers"]
    assert layers == ["input", "decoder.0", "decoder.1", "decoder.2", "decoder.3"]
    n = len(exp.meta["point_sample"])
    assert exp.axes["projection"] == ("layer", "point", "xy") and exp.maps["projection"].shape == (5, n, 2)
    assert exp.meta["point_modality"].count("image") == 10 * len(samples)
    assert exp.meta["point_modality"].count("text") == 6 * len(samples)
    assert set(exp.meta["point_label"]) & {"background"}
    assert "<s>" not in exp.meta["point_label"]  # special tokens are left out
    # recompute every point from output_hidden_states, then the projection and the gap
    states, images, texts = {}, {}, {}
    for s in samples:
        inputs, _ = demo.adapter.build_inputs(s.images, s.question)
        with torch.no_grad():
            states[s.id] = demo.model(**inputs, output_hidden_states=True).hidden_states
        ids = inputs["input_ids"][0]
        is_image = ids == demo.adapter.image_token_id
        is_special = torch.isin(ids, torch.as_tensor(demo.processor.tokenizer.all_special_ids))
        images[s.id] = torch.nonzero(is_image).flatten()
        texts[s.id] = torch.nonzero(~is_image & ~is_special).flatten()
    for li in range(len(layers) - 1):  # hidden_states[-1] is after the final norm
        points = np.stack([states[s][li][0, p].double().numpy()
                           for s, p in zip(exp.meta["point_sample"], exp.meta["point_position"])])
        centred = points - points.mean(0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        reference = centred @ vt[:2].T
        got = exp.maps["projection"][li]
        for k in range(2):
            sign = np.sign(reference[:, k] @ got[:, k])
            np.testing.assert_allclose(got[:, k], sign * reference[:, k], atol=1e-6 * np.abs(reference).max())
        unit = {m: torch.cat([unit_rows(states[s.id][li][0, pos[s.id]].double()) for s in samples])
                for m, pos in (("image", images), ("text", texts))}
        gap = float((unit["image"].mean(0) - unit["text"].mean(0)).norm())
        assert exp.maps["modality_gap"][li] == pytest.approx(gap, abs=1e-6)
        assert exp.scores[f"modality_gap.{layers[li]}"] == pytest.approx(gap, abs=1e-6)
    exp.save(tmp_path / "projection")
    back = Explanation.load(tmp_path / "projection")
    np.testing.assert_array_equal(back.maps["projection"], exp.maps["projection"])
    assert back.meta["point_label"] == exp.meta["point_label"]


@pytest.mark.parametrize("family", PROBE_FAMILIES)
def test_projection_runs_on_every_family(family, demo_set):
    loaded = tiny(family)
    exp = get_explainer("embedding.projection")().explain(loaded, demo_set[:3], image_points=8, text_points=8)
    layers = 1 + len(loaded.adapter.decoder_layers())
    assert exp.maps["projection"].shape == (layers, len(exp.meta["point_sample"]), 2)
    assert np.isfinite(exp.maps["projection"]).all()
    assert ((exp.maps["modality_gap"] >= 0) & (exp.maps["modality_gap"] <= 2)).all()
    assert {"image", "text"} == set(exp.meta["point_modality"])
    no_truth = [to_explain_sample(s) for s in generate_samples(2, seed=9)]
    for s in no_truth:
        s.extra.clear()
    bare = get_explainer("embedding.projection")().explain(loaded, no_truth, image_points=4, text_points=4)
    image_labels = {label for label, m in zip(bare.meta["point_label"], bare.meta["point_modality"]) if m == "image"}
    assert image_labels == {"image"}


def test_both_are_registered():
    table = registered()
    assert table["embedding.projection"].scope == "dataset"
    assert all(c.arxiv for c in table["embedding.projection"].citations)
