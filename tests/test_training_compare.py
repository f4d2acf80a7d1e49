"""One explainer on two checkpoints: the side-by-side maps are each checkpoint's own explanation.

Two demo-architecture models with random weights of different seeds are saved as folders and
loaded by spec, as a user's checkpoints would be; the reference maps come from running the inner
explainer on each model directly.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch


from loaded_models import TINY_QUESTION, random_demo_folder, tiny_loaded, tiny_prepared
from tiny_models import FAMILIES

import xmllm.explainers.demo
from xmllm.explainers.prepared import prepare
from xmllm.explainers.demo.samples import generate_samples, to_explain_sample
from xmllm.explainers.explanation import Explanation
from xmllm.explainers.methods.perturbation import Occlusion
from xmllm.explainers.methods.training import CompareCheckpoints, rank_correlation
from xmllm.explainers.models import ModelLoadError, load_model
from xmllm.explainers.registry import get_explainer

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

OCCLUSION = {"window": 2}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return random_demo_folder(root, 0), random_demo_folder(root, 1)


@pytest.fixture(scope="module")
def first(folders):
    return load_model(folders[0], device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def prep(first):
    return prepare(first, to_explain_sample(generate_samples(1, 0, question_types=["colour"])[0]))


def test_rank_correlation_by_hand():
    assert rank_correlation(np.array([1.0, 2, 3, 4]), np.array([10.0, 20, 30, 40])) == pytest.approx(1.0)
    assert rank_correlation(np.array([1.0, 2, 3, 4]), np.array([4.0, 3, 2, 1])) == pytest.approx(-1.0)
    # ties take the mean rank: x ranks 1, 2.5, 2.5, 4 against 1..4 -> r = 4.5 / sqrt(4.5 * 5)
    assert rank_correlation(np.array([1.0, 2, 2, 3]), np.array([1.0, 2, 3, 4])) == pytest.approx(4.5 / np.sqrt(22.5))
    assert rank_correlation(np.zeros(3), np.zeros(3)) == 1.0
    assert rank_correlation(np.zeros(3), np.arange(3.0)) is None


def test_a_checkpoint_compared_with_itself_differs_nowhere(first, prep, folders):
    exp = CompareCheckpoints().explain(first, prep, explainer="perturbation.occlusion", other=str(folders[0]),
                                       params=OCCLUSION)
    assert exp.meta["models"]["model"]["weights_sha256"] == exp.meta["models"]["other"]["weights_sha256"]
    for name in ("image", "image.answer"):
        np.testing.assert_array_equal(exp.maps[f"diff.{name}"], 0.0)
        np.testing.assert_array_equal(exp.maps[f"model.{name}"], exp.maps[f"other.{name}"])
        assert exp.scores[f"rank_correlation.{name}"] == 1.0 and exp.scores[f"max_abs_diff.{name}"] == 0.0
        assert exp.axes[f"diff.{name}"] == exp.axes[f"model.{name}"]
    assert exp.scores["same_greedy_answer"] == 1.0
    assert exp.meta["answers"]["model"] == exp.meta["answers"]["other"] == prep.answer.to_json()


def test_two_checkpoints_side_by_side_are_their_own_explanations(first, prep, folders, tmp_path):
    exp = CompareCheckpoints().explain(first, prep, explainer="perturbation.occlusion", other=str(folders[1]),
                                       params=OCCLUSION)
    second = load_model(folders[1], device="cpu", dtype="float32")
    mine = Occlusion().explain(first, prep, **OCCLUSION)
    forced = prepare(second, prep.sample, answer=prep.answer)
    theirs = Occlusion().explain(second, forced, **OCCLUSION)
    for name in ("image", "image.answer"):
        np.testing.assert_allclose(exp.maps[f"model.{name}"], mine.maps[name], atol=1e-6)
        np.testing.assert_allclose(exp.maps[f"other.{name}"], theirs.maps[name], atol=1e-6)
        np.testing.assert_allclose(exp.maps[f"diff.{name}"], theirs.maps[name] - mine.maps[name], atol=1e-6)
        assert np.abs(exp.maps[f"diff.{name}"]).max() > 0
        assert exp.scores[f"rank_correlation.{name}"] == pytest.approx(rank_correlation(mine.maps[name],
                                                                                          theirs.maps[name]))
    with torch.no_grad():
        logits = second.model(**dict(forced.inputs)).logits[0].float()
    probs = torch.softmax(logits[forced.logit_positions], -1)[torch.arange(len(prep.answer.token_ids)),
                                                              torch.tensor(prep.answer.token_ids)]
    np.testing.assert_allclose(exp.meta["answers"]["explained_probs"]["other"], probs.numpy(), rtol=1e-5)
    assert exp.meta["models"]["model"]["weights_sha256"] != exp.meta["models"]["other"]["weights_sha256"]
    exp.save(tmp_path / "compare")
    back = Explanation.load(tmp_path / "compare")
    assert back.axes == exp.axes and back.scores == exp.scores
    np.testing.assert_array_equal(back.maps["diff.image"], exp.maps["diff.image"])


def test_each_checkpoint_may_explain_its_own_answer(first, prep, folders):
    exp = CompareCheckpoints().explain(first, prep, explainer="intervention.attention_knockout", other=str(folders[1]),
                                       same_answer=False)
    assert exp.axes["diff.prob_change"] == ("edge", "window")
    assert exp.meta["edge_labels"] == exp.meta["inner_meta"]["model"]["edge_labels"]
    own = exp.meta["answers"]["other"]
    assert exp.meta["answers"]["explained"]["other"] == own["text"]
    assert exp.scores["same_greedy_answer"] == float(own["token_ids"] == list(prep.answer.token_ids))


def test_demo_early_is_the_default_partner_of_demo(monkeypatch, folders, prep):
    monkeypatch.setattr(xmllm.explainers.demo, "DEMO_MODEL_DIR", folders[0])
    monkeypatch.setattr(xmllm.explainers.demo, "DEMO_EARLY_MODEL_DIR", folders[1])
    demo = load_model("demo", device="cpu", dtype="float32")
    early = load_model("demo-early", device="cpu", dtype="float32")
    assert early.source == str(folders[1]) and early.spec == "demo-early"
    exp = CompareCheckpoints().explain(demo, prep.sample, params=OCCLUSION)
    assert exp.params["other"] == "demo-early" and exp.meta["models"]["other"]["source"] == str(folders[1])
    monkeypatch.setattr(xmllm.explainers.demo, "DEMO_EARLY_MODEL_DIR", folders[1].parent / "missing")
    with pytest.raises(ModelLoadError, match="reinstall") as info:
        load_model("demo-early", device="cpu")
    assert "\n" not in str(info.value) and "missing" in str(info.value)


def test_bad_parameters_are_one_line_errors(first, prep, folders):
    for params, fragment in (({"explainer": "nope.nothing"}, "unknown explainer"),
                             ({"explainer": "training.compare"}, "other than"),
                             ({"other": None}, "needs a second checkpoint"), ({"other": 3}, "model spec"),
                             ({"other": str(folders[0]), "params": [1]}, "mapping"),
                             ({"other": str(folders[0]), "depth": 1}, "unknown parameter")):
        with pytest.raises(ValueError, match=fragment) as info:
            CompareCheckpoints().explain(first, prep, **params)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("family", FAMILIES)
def test_compare_runs_on_every_family(family):
    loaded = tiny_loaded(family)
    prep = tiny_prepared(family, TINY_QUESTION, tokens=2, seed=0)
    same = get_explainer("training.compare")().explain(loaded, prep, other=loaded, params=OCCLUSION)
    assert all(np.all(v == 0) for k, v in same.maps.items() if k.startswith("diff."))
    assert all(v == 1.0 for k, v in same.scores.items() if k.startswith("rank_correlation."))
    changed = copy.copy(loaded)
    changed.model = copy.deepcopy(loaded.model)
    with torch.no_grad():
        for parameter in changed.model.get_output_embeddings().parameters():
            parameter.mul_(-1.0)
    changed.adapter = type(loaded.adapter)(changed.model, loaded.processor)
    other = CompareCheckpoints().explain(loaded, prep, other=changed, params=OCCLUSION)
    assert other.scores["other.prob_answer"] != pytest.approx(other.scores["model.prob_answer"])
    np.testing.assert_allclose(other.maps["diff.image.answer"],
                               other.maps["other.image.answer"] - other.maps["model.image.answer"], atol=1e-9)
