"""What is explained: whole answers, given answers, contrasts, skipped explainers, unknown words,
devices and dtypes; on the trained demo model, through the CLI and the API."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import xmllm
from xmllm import XmllmError
from xmllm.cli import main
from xmllm.explainers.answering import GIVEN, STOPPED_END, STOPPED_LIMIT, generate_answer
from xmllm.explainers.prepared import ExplainSample, prepare
from xmllm.explainers.demo.samples import generate_samples
from xmllm.explainers.registry import get_explainer, registered

CONTRASTED = ["gradient.saliency", "gradient.integrated", "relevancy.chefer", "perturbation.occlusion"]


@pytest.fixture(scope="module")
def demo():
    return xmllm.load_model("demo", device="cpu")


@pytest.fixture(scope="module")
def purple_diamond():
    """Demo questions "What colour is the diamond?" answered purple, with another object beside it."""
    found = [s for s in generate_samples(400, 11, question_types=["colour"])
             if s.answer == "purple" and "diamond" in s.text and len(s.scene.objects) >= 2]
    assert len(found) >= 3
    return found[:3]


def _cells(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """The grid cells that count as showing an object: the evaluation's rule (MIN_COVER of the cell)."""
    from xmllm.explainers.metrics.truth import MIN_COVER

    rows, cols = grid
    h, w = mask.shape
    return mask.reshape(rows, h // rows, cols, w // cols).mean(axis=(1, 3)) >= MIN_COVER


def test_describe_answers_are_whole_and_the_limit_is_recorded(demo) -> None:
    scenes = [s for s in generate_samples(60, 5, question_types=["colour"]) if len(s.scene.objects) == 4][:3]
    assert scenes
    for sample in scenes:
        full = generate_answer(demo, [sample.image()], "Describe the image.")
        assert full.stopped == STOPPED_END and full.text.count(",") == 3, full  # four objects, all named
        cut = generate_answer(demo, [sample.image()], "Describe the image.", max_new_tokens=2)
        assert cut.stopped == STOPPED_LIMIT and cut.cut and len(cut.token_ids) == 2
        assert full.text.startswith(cut.text)


def test_a_cut_answer_is_recorded_and_warned_in_the_run(demo, purple_diamond) -> None:
    sample = purple_diamond[0]
    run = xmllm.explain(demo, sample.image(), "Describe the image.", ["gradient.saliency"], max_new_tokens=2)
    assert run.answer["stopped"] == "length" and run.answer["max_new_tokens"] == 2
    assert any("cut at max_new_tokens=2" in w for w in run.manifest["warnings"])
    whole = xmllm.explain(demo, sample.image(), "Describe the image.", ["gradient.saliency"])
    assert whole.answer["stopped"] == "end" and "warnings" not in whole.manifest


def test_contrast_purple_rather_than_blue_points_at_the_diamond(demo, purple_diamond) -> None:
    """"Why purple rather than blue?" on three purple-diamond scenes: the contrast maps of integrated
    gradients and relevancy put their hottest cell on the diamond; the local explainers that target
    the log-probability by default (saliency, occlusion) give contrast maps far from the near-zero
    maps of the saturated answer (p(purple) > 0.999, so its log-probability hardly moves; integrated
    gradients integrates from a black image, where it is not saturated, and relevancy targets the
    logit by default, which does not saturate)."""
    for sample in purple_diamond:
        run = xmllm.explain(demo, sample.image(), sample.text, CONTRASTED, contrast="blue")
        plain = xmllm.explain(demo, sample.image(), sample.text, CONTRASTED, faithfulness=False)
        assert run.answer["text"] == "purple" and run.manifest["contrast"]["text"] == "blue"
        assert run.manifest["contrast"]["differing"] == [0] and plain.answer["probs"][0] > 0.99
        diamond = _cells(sample.mask(), (8, 8))
        for eid in CONTRASTED:
            values = run[eid].maps["image.answer"]
            assert run[eid].target.contrast == "blue" and plain[eid].target.contrast is None
            if eid in ("gradient.saliency", "perturbation.occlusion"):
                assert np.abs(values).max() > 10 * np.abs(plain[eid].maps["image.answer"]).max(), (sample.id, eid)
            if eid in ("gradient.integrated", "relevancy.chefer"):
                r, c = np.unravel_index(np.argmax(values), values.shape)
                assert diamond[r, c], (sample.id, eid)


def test_contrast_is_the_difference_of_the_two_log_probabilities(demo, purple_diamond) -> None:
    sample = ExplainSample([purple_diamond[0].image()], purple_diamond[0].text)
    plain = prepare(demo, sample)
    foil = prepare(demo, sample, answer="blue")
    contrasted = plain.with_contrast("blue")
    logits = plain.forward().logits
    expected = plain.answer_logprobs(logits) - foil.answer_logprobs(foil.forward().logits)
    np.testing.assert_allclose(contrasted.answer_logprobs(logits).detach().numpy(), expected.detach().numpy(), atol=1e-5)
    exp = get_explainer("perturbation.occlusion")().explain(demo, contrasted)
    assert exp.scores["logprob_answer"] == pytest.approx(float(expected.detach().sum()), abs=1e-4)
    with pytest.raises(XmllmError, match="same tokens as the answer"):
        plain.with_contrast("purple")
    with pytest.raises(XmllmError, match="not a contrast"):
        get_explainer("attention.rollout")().explain(demo, contrasted)


def test_a_given_answer_is_explained_with_its_probabilities(demo, purple_diamond, tmp_path, capsys) -> None:
    sample = purple_diamond[0]
    image = tmp_path / "scene.png"
    sample.image().save(image)
    assert main(["explain", "--image", str(image), "--question", sample.text, "--answer", "blue",
                 "--explainers", "gradient.saliency,perturbation.occlusion", "--out", str(tmp_path / "run")]) == 0
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["answer"]["text"] == "blue" and manifest["answer"]["stopped"] == GIVEN
    p_blue = manifest["answer"]["probs"][0]
    own = generate_answer(demo, [sample.image()], sample.text)
    assert own.text == "purple" and 0 < p_blue < 0.5 < own.probs[0]  # the model does not believe it
    assert "answer: 'blue'" in capsys.readouterr().out


def test_contrast_from_the_command_line(demo, purple_diamond, tmp_path, capsys) -> None:
    """``xmllm explain --contrast``: the manifest, the explanation's target and the map say "purple
    rather than blue", and the map is the API's for the same request."""
    sample = purple_diamond[0]
    image = tmp_path / "scene.png"
    sample.image().save(image)
    out = tmp_path / "run"
    assert main(["explain", "--image", str(image), "--question", sample.text, "--contrast", "blue",
                 "--explainers", "gradient.saliency", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["answer"]["text"] == "purple" and manifest["contrast"]["text"] == "blue"
    saved = xmllm.load_run(out)
    assert saved["gradient.saliency"].target.contrast == "blue"
    api = xmllm.explain(demo, sample.image(), sample.text, ["gradient.saliency"], contrast="blue")
    np.testing.assert_allclose(saved["gradient.saliency"].maps["image.answer"],
                               api["gradient.saliency"].maps["image.answer"], rtol=1e-5, atol=1e-7)
    assert main(["explain", "--image", str(image), "--question", sample.text, "--contrast", "blue",
                 "--explainers", "attention.rollout", "--out", str(tmp_path / "refused")]) == 2
    assert "attention.rollout" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "refused").exists()


def test_explainers_that_cannot_run_are_skipped_in_a_leaf_and_refused_alone(demo, tmp_path, capsys) -> None:
    image = tmp_path / "own.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(image)
    leaf = ["explain", "--image", str(image), "--question", "What colour is the square?", "--leaf",
            "data.input-output", "--param", "gradient.integrated.n_steps=4", "--out", str(tmp_path / "leaf")]
    assert main(leaf) == 0
    manifest = json.loads((tmp_path / "leaf" / "manifest.json").read_text())
    assert "demo-world ground truth" in manifest["skipped"]["data.counterfactual"]
    assert "data.counterfactual" not in manifest["explainers"] and "perturbation.occlusion" in manifest["explainers"]
    assert "skipped data.counterfactual: needs demo-world ground truth" in capsys.readouterr().err
    report = (tmp_path / "leaf" / "report.html").read_text()
    assert "data.counterfactual" in report and "needs demo-world ground truth" in report
    alone = ["explain", "--image", str(image), "--question", "What colour is the square?", "--explainers",
             "data.counterfactual", "--out", str(tmp_path / "alone")]
    assert main(alone) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("xmllm: error: data.counterfactual: needs demo-world ground truth")
    assert not (tmp_path / "alone").exists()
    from xmllm.explainers.demo import DEMO_MODEL_DIR

    by_folder = xmllm.load_model(DEMO_MODEL_DIR, device="cpu")  # the same weights, with no known earlier checkpoint
    with pytest.raises(XmllmError, match="training.compare: needs a second checkpoint"):
        xmllm.explain(by_folder, str(image), "What colour?", ["training.compare"])


def test_unknown_words_are_warned_and_recorded(demo, tmp_path, capsys) -> None:
    image = tmp_path / "own.png"
    Image.new("RGB", (64, 64), (20, 30, 200)).save(image)
    run = xmllm.explain(demo, image, "What colour is the cat?", ["gradient.saliency"])
    assert run.manifest["unknown_words"] == ["cat"]
    assert any("'cat'" in w for w in run.manifest["warnings"])
    assert main(["ask", "--image", str(image), "--question", "What colour is the cat?"]) == 0
    assert "xmllm: warning: the tokenizer does not know 'cat' in the question" in capsys.readouterr().err


def test_dtype_and_missing_devices(tmp_path, capsys) -> None:
    bf16 = xmllm.load_model("demo", device="cpu", dtype="bfloat16")
    assert bf16.provenance()["dtype"] == "bfloat16"
    capsys.readouterr()  # the loader's progress bar
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(image)
    for argv in (["ask", "--image", str(image), "--question", "What colour?", "--device", "cuda:7"],
                 ["explain", "--image", str(image), "--question", "What colour?", "--device", "cuda",
                  "--out", str(tmp_path / "o")],
                 ["ask", "--image", str(image), "--question", "What colour?", "--max-new-tokens", "-1"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("xmllm: error: "), err
    assert not (tmp_path / "o").exists()


def test_an_over_long_question_is_refused(demo) -> None:
    with pytest.raises(XmllmError, match=r"over the model's context of 256 positions"):
        xmllm.explain(demo, np.zeros((32, 32, 3), dtype=np.uint8), "what colour is it " * 200, ["gradient.saliency"])


def test_integrated_gradients_warns_on_any_tokens_gap(demo, purple_diamond) -> None:
    prep = prepare(demo, ExplainSample([purple_diamond[0].image()], "Describe the image."))
    assert len(prep.answer.token_ids) > 2
    rough = get_explainer("gradient.integrated")().explain(demo, prep, n_steps=1)
    per_token = np.abs(np.array(rough.meta["token_logprob_change"]))
    assert rough.scores["completeness_gap_relative_max_token"] > 0.05
    assert "warning" in rough.meta and "increase n_steps" in rough.meta["warning"]
    named = [t for t in prep.answer.tokens if repr(t) in rough.meta["warning"]]
    assert named or "the whole answer" in rough.meta["warning"], rough.meta["warning"]
    assert per_token.size == len(prep.answer.token_ids)


def test_only_gradient_relevancy_and_perturbation_explainers_take_a_contrast() -> None:
    takes = sorted(eid for eid, cls in registered().items() if cls.supports_contrast)
    assert takes == sorted(eid for eid in registered() if eid.split(".")[0] in ("gradient", "relevancy", "perturbation"))
