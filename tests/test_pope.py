"""benchmark.pope: negatives built from the ground truth, real greedy answers, metrics recounted
by hand from the recorded answers, on the demo architecture and tiny models of three families."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch


from tiny_models import build_tiny, missing_dependency

from xmllm.explainers.answering import generate_answer
from xmllm.explainers.demo.model import build_model, build_processor
from xmllm.explainers.demo.questions import Presence
from xmllm.explainers.demo.samples import generate_samples, to_explain_sample
from xmllm.explainers.demo.world import Scene
from xmllm.explainers.explanation import Explanation
from xmllm.explainers.methods.benchmark import METRICS, SETTINGS, build_questions, parse_yes_no, pope_metrics
from xmllm.explainers.models import LoadedModel, adapter_for
from xmllm.explainers.registry import Need, get_explainer

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

FAMILIES = ("llava", "qwen2_vl", "gemma3")


def loaded_from(model, processor, name: str) -> LoadedModel:
    return LoadedModel(model.eval(), processor, adapter_for(model, processor), name, "tests",
                       torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def demo_set():
    return [to_explain_sample(s) for s in generate_samples(6, seed=21)]


@pytest.fixture(scope="module")
def demo_run(demo_set) -> tuple[LoadedModel, Explanation]:
    """POPE on the demo architecture with random weights: real greedy answers of a real model."""
    processor = build_processor()
    loaded = loaded_from(build_model(processor.tokenizer, seed=3), processor, "demo-random")
    return loaded, get_explainer("benchmark.pope")().explain(loaded, demo_set, seed=4)


def hand_metrics(records: list[dict]) -> dict[str, float]:
    """POPE's metrics counted directly, independently of pope_metrics."""
    tp = fp = fn = tn = other = 0
    for r in records:
        said = r["prediction"]
        if r["truth"] == "yes":
            tp += said == "yes"
            fn += said != "yes"
        else:
            fp += said == "yes"
            tn += said == "no"
        other += said == "other"
    n = len(records)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {"accuracy": (tp + tn) / n, "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "yes_ratio": (tp + fp) / n, "other_ratio": other / n}


def assert_recounts(exp: Explanation) -> None:
    answers = exp.meta["answers"]
    for i, setting in enumerate(exp.meta["settings"]):
        chosen = [answers[k] for k in exp.meta["questions"][setting]]
        expected = hand_metrics(chosen)
        for j, metric in enumerate(exp.meta["metrics"]):
            assert exp.maps["metrics"][i, j] == pytest.approx(expected[metric], abs=1e-12), (setting, metric)
            assert exp.scores[f"{setting}.{metric}"] == pytest.approx(expected[metric], abs=1e-12)
        assert exp.maps["confusion"][i].sum() == len(chosen) == exp.scores[f"{setting}.questions"]
        assert all(setting in r["settings"] for r in chosen)
        assert all(r["prediction"] == parse_yes_no(r["answer"]) for r in chosen)


# --- parsing and metrics ---------------------------------------------------------------------------------


def test_parsing_follows_pope_and_keeps_unclear_answers_apart():
    assert parse_yes_no("Yes") == "yes"
    assert parse_yes_no("yes, there is.") == "yes"
    assert parse_yes_no("No") == "no"
    assert parse_yes_no("There is not.") == "no"
    assert parse_yes_no("yes no") == "no"  # POPE reads any no as no
    assert parse_yes_no("red circle") == "other"
    assert parse_yes_no("") == "other"


def test_metrics_equal_a_hand_computation():
    truths = ["yes", "yes", "yes", "no", "no", "no", "no", "yes"]
    said = ["yes", "no", "other", "yes", "no", "no", "other", "yes"]
    got = pope_metrics(truths, said)
    # tp=2 (0, 7), fn=2 (1, 2), fp=1 (3), tn=2 (4, 5), other=2 (2, 6)
    assert got["accuracy"] == pytest.approx(4 / 8)
    assert got["precision"] == pytest.approx(2 / 3)
    assert got["recall"] == pytest.approx(2 / 4)
    assert got["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert got["yes_ratio"] == pytest.approx(3 / 8)
    assert got["other_ratio"] == pytest.approx(2 / 8)
    assert pope_metrics(["yes", "no"], ["other", "other"])["precision"] == 0.0
    assert set(got) == set(METRICS)


# --- the questions ---------------------------------------------------------------------------------------


def test_negatives_never_name_a_present_object_and_follow_their_setting():
    samples = [to_explain_sample(s) for s in generate_samples(60, seed=8)]
    keys = [[(o["colour"], o["shape"]) for o in s.extra["objects"]] for s in samples]
    questions = build_questions(keys, SETTINGS, per_image=3, seed=1)
    frequency = Counter(k for image in keys for k in set(image))
    for setting in SETTINGS:
        by_image: dict[int, list] = {}
        for p in questions[setting]:
            by_image.setdefault(p.sample, []).append(p)
        assert set(by_image) == set(range(len(samples)))
        for index, asked in by_image.items():
            present = set(keys[index])
            yes = [p for p in asked if p.truth == "yes"]
            no = [p for p in asked if p.truth == "no"]
            assert all((p.colour, p.shape) in present for p in yes)
            assert all((p.colour, p.shape) not in present for p in no)  # never a present object
            assert len(yes) == min(3, len(present))
            assert len({(p.colour, p.shape) for p in no}) == len(no)
            if setting != "adversarial":
                assert len(no) == len(yes)
            if setting == "popular":
                absent = [k for k in frequency if k not in present]
                floor = min(frequency[(p.colour, p.shape)] for p in no)
                assert all(frequency[k] <= floor for k in absent if k not in {(p.colour, p.shape) for p in no})
            if setting == "adversarial":
                colours, shapes = {c for c, _ in present}, {s for _, s in present}
                assert all(p.colour in colours or p.shape in shapes for p in no)
    # the same positives in every setting; the same seed, the same questions
    assert [p for p in questions["random"] if p.truth == "yes"] == [p for p in questions["popular"] if p.truth == "yes"]
    assert build_questions(keys, SETTINGS, 3, seed=1) == questions
    assert build_questions(keys, SETTINGS, 3, seed=2)["random"] != questions["random"]


# --- the benchmark on real models ------------------------------------------------------------------------


def test_pope_on_the_demo_architecture(demo_run, demo_set, tmp_path):
    loaded, exp = demo_run
    cls = get_explainer("benchmark.pope")
    assert cls.scope == "dataset" and Need.LABELLED_SET in cls.needs
    assert [c.arxiv for c in cls.citations] == ["2305.10355"]
    assert exp.axes["metrics"] == ("setting", "metric") and exp.maps["metrics"].shape == (3, len(METRICS))
    assert exp.axes["confusion"] == ("setting", "truth", "prediction")
    assert exp.meta["settings"] == list(SETTINGS)
    assert_recounts(exp)
    scenes = {s.id: Scene.from_json(s.extra["objects"]) for s in demo_set}
    for r in exp.meta["answers"]:
        colour, shape = r["object"].split()
        # the demo world's own presence question, and its own answer as the truth
        assert r["question"] == Presence.templates[0].format(colour=colour, shape=shape)
        assert r["truth"] == Presence().answer({"colour": colour, "shape": shape}, scenes[r["sample"]])
    assert exp.scores["answers_generated"] == len(exp.meta["answers"])
    # answers are the model's real greedy answers
    by_id = {s.id: s for s in demo_set}
    for r in exp.meta["answers"][:3]:
        assert generate_answer(loaded, by_id[r["sample"]].images, r["question"]).text == r["answer"]
    exp.save(tmp_path / "pope")
    back = Explanation.load(tmp_path / "pope")
    np.testing.assert_array_equal(back.maps["metrics"], exp.maps["metrics"])
    assert back.meta["answers"] == exp.meta["answers"]


def test_pope_is_reproducible_and_checks_its_input(demo_run, demo_set):
    loaded, exp = demo_run
    pope = get_explainer("benchmark.pope")()
    again = pope.explain(loaded, demo_set, seed=4)
    np.testing.assert_array_equal(again.maps["metrics"], exp.maps["metrics"])
    assert again.meta["answers"] == exp.meta["answers"]
    bare = [to_explain_sample(s) for s in generate_samples(2, seed=21)]
    bare[0].extra.pop("objects")
    with pytest.raises(ValueError, match=r"sample 's21-00000' has no extra\['objects'\]") as err:
        pope.explain(loaded, bare)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="settings"):
        pope.explain(loaded, demo_set, settings=["hard"])
    with pytest.raises(ValueError, match="template"):
        pope.explain(loaded, demo_set, template="Is there a {thing}?")
    with pytest.raises(ValueError, match="dataset-scope"):
        pope.explain(loaded, demo_set[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_pope_on_tiny_models(family, demo_set):
    package = missing_dependency(family)
    if package:
        pytest.skip(f"the {family} processor needs {package}, which is not installed")
    loaded = loaded_from(*build_tiny(family), f"tiny-{family}")
    exp = get_explainer("benchmark.pope")().explain(loaded, demo_set[:2], per_image=1, max_new_tokens=2)
    assert_recounts(exp)
    assert exp.maps["metrics"].shape == (3, len(METRICS))
    assert all(r["truth"] in ("yes", "no") for r in exp.meta["answers"])
    assert len(exp.meta["answers"]) >= 2 * 2  # a present and an absent object per image at least
