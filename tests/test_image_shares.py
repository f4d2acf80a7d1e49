"""Several pictures, one explanation: every map explainer maps each picture, each picture's share
of the map, a whole picture hidden by occlusion, a causal set that may span pictures, and the
report's strip saying which picture carried the answer (#25 items 2-3)."""
from __future__ import annotations

import os

from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

import xmllm
from xmllm.explainers.demo.samples import generate_samples
from xmllm.explainers.explanation import Explanation, Target
from xmllm.explainers.metrics.image_shares import image_shares
from xmllm.report.summary import why_panel

EXPLAINERS = ["relevancy.chefer", "gradient.saliency", "perturbation.occlusion", "causal.minimal_set"]

LONG_CHECKS = os.environ.get("XMLLM_LONG_CHECKS") == "1"
long_check = pytest.mark.skipif(not LONG_CHECKS, reason="a long check: .ci/run runs it as its own step (XMLLM_LONG_CHECKS=1)")



def layouts(n: int) -> list[dict]:
    return [{"image": k, "grids": [{"map": "image" if k == 0 else f"image{k}.image", "main": True,
                                    "region": [0.0, 0.0, 1.0, 1.0]}]} for k in range(n)]


def explanation(maps: dict[str, np.ndarray]) -> Explanation:
    exp = Explanation("x.test", {}, Target("a", [1], ["a"], [0], [0.5]))
    for name, values in maps.items():
        exp.add(name, values, ("answer_token", "row", "col") if values.ndim == 3 else ("row", "col"))
    return exp


def test_shares_are_positive_mass_per_picture_on_the_scored_map() -> None:
    first = np.array([[1.0, -5.0], [2.0, 0.0]])
    second = np.array([[0.0, 6.0], [np.nan, -1.0]])
    exp = explanation({"image.answer": first, "image1.image.answer": second,
                       "image": np.stack([first * 10]), "image1.image": np.stack([second])})
    shares = image_shares(exp, layouts(2), 2)
    assert shares is not None and shares.base == "image.answer"  # the whole answer's map, as the metrics score
    assert shares.shares == pytest.approx([3.0 / 9.0, 6.0 / 9.0])
    assert shares.carrier == 1 and np.array_equal(shares.maps[0], first)


def test_no_shares_for_one_picture_an_unmapped_picture_or_no_positive_mass() -> None:
    grid = np.ones((2, 2))
    assert image_shares(explanation({"image": grid}), layouts(1), 1) is None
    assert image_shares(explanation({"image": grid}), layouts(2), 2) is None  # picture 2 not mapped
    assert image_shares(explanation({"image": -grid, "image1.image": -grid}), layouts(2), 2) is None


@pytest.fixture(scope="module")
def two_pictures():
    samples = generate_samples(2, 0)
    pictures = [s.image() for s in samples]
    question = samples[1].text
    run = xmllm.explain("demo", pictures, question, EXPLAINERS, params={"causal.minimal_set": {"regenerate": False}})
    return pictures, question, run


@pytest.mark.slow
@long_check
def test_every_map_explainer_maps_both_pictures(two_pictures) -> None:
    _, _, run = two_pictures
    for eid in EXPLAINERS:
        exp = run[eid]
        assert "image" in exp.maps and "image1.image" in exp.maps, (eid, sorted(exp.maps))
        assert exp.maps["image"].shape[-2:] == exp.maps["image1.image"].shape[-2:]


@pytest.mark.slow
@long_check
def test_occlusion_hides_each_picture_whole_as_a_black_picture_would(two_pictures) -> None:
    pictures, question, run = two_pictures
    occlusion = run["perturbation.occlusion"]
    answer = run.answer["text"]
    for k in range(2):
        hidden = list(pictures)
        hidden[k] = Image.new("RGB", pictures[k].size, (0, 0, 0))  # the default baseline, through the processor
        scored = xmllm.explain("demo", hidden, question, ["perturbation.occlusion"], answer=answer)
        drop = occlusion.scores["logprob_answer"] - scored["perturbation.occlusion"].scores["logprob_answer"]
        assert occlusion.scores[f"image_drop.{k + 1}"] == pytest.approx(drop, abs=1e-4)


@pytest.mark.slow
@long_check
def test_the_causal_set_is_searched_over_both_pictures(two_pictures) -> None:
    _, _, run = two_pictures
    causal = run["causal.minimal_set"]
    ranked = causal.meta["ranking"]
    assert {r.get("image", 0) for r in ranked if r["kind"] == "cell"} == {0, 1}
    cells = causal.meta["set"]["cells"]
    pictures = causal.meta["set"]["cell_images"]
    assert len(pictures) == len(cells)
    marked = causal.maps["image"].sum() + causal.maps["image1.image"].sum()
    assert marked == len(cells)


class Strips(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.strips: list[str] = []
        self.carried = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "figure" and "strip" in (attrs.get("class") or "").split():
            self.strips.append(attrs["data-explainer"])
        if attrs.get("id") == "why-carried":
            self.carried = True


@pytest.mark.slow
@long_check
def test_the_report_strip_shows_each_pictures_share(two_pictures, tmp_path) -> None:
    _, _, run = two_pictures
    panel = why_panel(run)
    ranked = {st.explainer: st for st in panel.strips}
    assert "relevancy.chefer" in ranked and "causal.minimal_set" not in ranked  # a 0/1 set ranks no cells
    for eid, strip in ranked.items():
        expected = image_shares(run[eid], run.manifest["layouts"], 2)
        assert strip.shares == pytest.approx(expected.shares, abs=1e-4) and sum(strip.shares) == pytest.approx(1.0)
        assert strip.labels == ["image 1", "image 2"]
    assert panel.carried and panel.carried.split()[:2] in (["Image", "1"], ["Image", "2"])
    run.save(tmp_path / "run")
    parsed = Strips()
    parsed.feed((tmp_path / "run" / "report.html").read_text(encoding="utf-8"))
    assert parsed.strips == [st.explainer for st in panel.strips] and parsed.carried
