"""The report leads with the why: the panel at the top of a real report of the trained demo model,
parsed back."""
from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
from html_tree import parse
from PIL import Image
from scipy.stats import spearmanr

import xmllm
from xmllm.explainers.demo.samples import generate_samples
from xmllm.explainers.metrics.stats import spearman
from xmllm.report.summary import why_panel

IDS = ["relevancy.chefer", "attention.rollout", "perturbation.occlusion", "causal.minimal_set", "gradient.integrated"]


@pytest.fixture(scope="module")
def run():
    model = xmllm.load_model("demo", device="cpu")
    sample = generate_samples(1, seed=0, question_types=["colour"])[0]
    return xmllm.explain(model, sample.image(), sample.text, IDS, params={"gradient.integrated": {"n_steps": 8}})


def test_the_panel_comes_first_with_one_small_map_per_image_explainer(run) -> None:
    html = run.report_html()
    tree = parse(html)
    main = tree.find("main")
    first = next(e for e in main.children if not isinstance(e, str))
    assert first.attrs.get("id") == "why"
    figures = tree.find(id="why-maps").find_all("figure")
    assert [f.attrs["data-explainer"] for f in figures] == IDS  # every one of them gives an image map
    for figure in figures:
        src = figure.find("img").attrs["src"]
        assert src.startswith("data:image/png;base64,")
        thumb = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        width, height = thumb.size
        assert width > height  # the map and, beside it, its colour bar
        assert "own colour scale" in figure.text


def test_agreement_is_the_rank_correlation_of_the_maps(run) -> None:
    from xmllm.explainers.metrics import primary_image_map

    panel = why_panel(run)
    labels = panel.agreement["labels"]
    assert labels == [e for e in IDS if e != "causal.minimal_set"]
    maps = {e: primary_image_map(run[e]).values for e in labels}
    for i, a in enumerate(labels):
        for j, b in enumerate(labels):
            expected = spearmanr(maps[a].ravel(), maps[b].ravel()).statistic
            assert panel.agreement["matrix"][i][j] == pytest.approx(expected, abs=0.006), (a, b)
    table = parse(run.report_html()).find(id="why-agreement")
    assert len(table.find_all("tr")) == len(labels) + 1
    assert spearman(np.ones((2, 2)), np.arange(4.0).reshape(2, 2)) == 0.0


def test_the_causal_result_is_said_in_words(run) -> None:
    exp = run["causal.minimal_set"]
    sentence = parse(run.report_html()).find(id="why-causal").text
    if exp.meta["status"] == "flipped":
        n = len(exp.meta["set"]["cells"])
        assert re.search(rf"masking (this|these) (image cell|{n} image cells) turns “{exp.meta['original_token']}” "
                         rf"into “{exp.meta['new_top_token']}”", sentence), sentence
    else:
        assert "no small set of cells changes the answer" in sentence


def test_maps_near_noise_say_so_and_name_the_parameter(run) -> None:
    panel = why_panel(run)
    for thumb in panel.thumbs:
        largest = max(abs(thumb.low), abs(thumb.high))
        if thumb.explainer != "causal.minimal_set" and largest < 1e-3:
            assert thumb.noise and "near numerical noise" in thumb.noise and "--" in thumb.noise
        else:
            assert thumb.noise is None
    # a saturated answer (p > 0.9999) leaves the log-prob relevancy map near noise: the panel says so
    # and names the parameter that helps
    saturated = generate_samples(4, seed=0, question_types=["colour"])[3]
    logprob = xmllm.explain(xmllm.load_model("demo", device="cpu"), saturated.image(), saturated.text,
                            ["relevancy.chefer"], params={"relevancy.chefer": {"target": "logprob"}})
    assert logprob.answer["probs"][0] > 0.9999
    chefer = next(t for t in why_panel(logprob).thumbs if t.explainer == "relevancy.chefer")
    assert chefer.noise and "target=logit" in chefer.noise


def test_a_cut_answer_is_said_at_the_top() -> None:
    model = xmllm.load_model("demo", device="cpu")
    sample = generate_samples(1, seed=0, question_types=["colour"])[0]
    cut = xmllm.explain(model, sample.image(), "Describe the image.", ["gradient.saliency"], max_new_tokens=1)
    note = parse(cut.report_html()).find(id="answer-cut")
    assert "max_new_tokens=1" in note.text and "--max-new-tokens" in note.text
