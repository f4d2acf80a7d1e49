"""Image-level pointing in ``xmllm evaluate`` (#25 item 4, on user sample sets): with several
pictures and an ``evidence_image``, 1 where the largest share of an explainer's map falls on the
evidence picture; the random floor picks a picture at random."""
from __future__ import annotations

import os

import json

import numpy as np
import pytest

import xmllm
from xmllm.explainers.demo.samples import generate_samples
from xmllm.evaluation.scoring import split_label
from xmllm.explainers.metrics.image_shares import image_shares

EXPLAINERS = ["gradient.saliency", "relevancy.chefer"]

LONG_CHECKS = os.environ.get("XMLLM_LONG_CHECKS") == "1"
long_check = pytest.mark.skipif(not LONG_CHECKS, reason="a long check: .ci/run runs it as its own step (XMLLM_LONG_CHECKS=1)")



@pytest.fixture(scope="module")
def paired_set(tmp_path_factory):
    folder = tmp_path_factory.mktemp("paired")
    samples = generate_samples(6, 4)
    lines = []
    for k in range(3):
        evidence, other = samples[2 * k], samples[2 * k + 1]
        evidence.image().save(folder / f"{evidence.id}.png")
        other.image().save(folder / f"{other.id}.png")
        order = [f"{other.id}.png", f"{evidence.id}.png"] if k % 2 == 0 else [f"{evidence.id}.png", f"{other.id}.png"]
        lines.append({"id": f"pair-{k}", "image": order, "question": evidence.text, "answer": evidence.answer,
                      "evidence_image": 2 if k % 2 == 0 else 1})
    path = folder / "samples.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path, lines


@pytest.mark.slow
@long_check
def test_image_pointing_is_scored_per_sample_and_summarised(paired_set):
    path, lines = paired_set
    result = xmllm.evaluate("demo", samples=path, explainers=EXPLAINERS, sanity_samples=0)
    assert "image_pointing" in [m["name"] for m in result["metrics"]]
    by_id = {r["id"]: r for r in result["per_sample"]}
    labels = result["config"]["explainers"]  # a target-taking explainer is scored per target
    assert {split_label(label)[0] for label in labels} == set(EXPLAINERS)
    for line in lines:
        pictures = [str(path.parent / name) for name in line["image"]]
        for label in labels:  # the carrier of an independent explanation of the same sample
            eid, params = split_label(label)
            run = xmllm.explain("demo", pictures, line["question"], [eid], params={eid: params}, faithfulness=False)
            shares = image_shares(run[eid], run.manifest["layouts"], 2)
            expected = float(shares.carrier + 1 == line["evidence_image"])
            assert by_id[line["id"]]["scores"][label]["image_pointing"] == expected, (line["id"], label)
        assert by_id[line["id"]]["scores"]["random"]["image_pointing"] in (0.0, 1.0)
    for label in labels:
        hits = [by_id[line["id"]]["scores"][label]["image_pointing"] for line in lines]
        assert result["table"][label]["image_pointing"]["mean"] == pytest.approx(np.mean(hits))


@pytest.mark.slow
@long_check
def test_the_demo_picture_questions_are_scored_on_the_evidence_picture():
    """``evaluate --demo-pictures``: every sample's evidence is in one of its pictures; image pointing
    is scored on each, and the cell metrics on the evidence picture's grid (ground truth from its mask:
    never empty, whichever picture it is)."""
    result = xmllm.evaluate("demo", demo_pictures=9, explainers=["perturbation.occlusion"], sanity_samples=0, seed=3)
    records = result["per_sample"]
    assert result["samples"]["pictures"] and len(records) == 9
    assert {r["question_type"] for r in records} == {"which_picture", "count_pictures", "which_frame"}
    assert all(r["truth_cells"] > 0 for r in records)
    from xmllm.evaluation import demo_samples

    evidence = [s.extra["evidence_image"] for s in demo_samples(9, 3, pictures=True)]
    assert set(evidence) >= {1, 2}  # the evidence is not always the first picture
    hits = [r["scores"]["perturbation.occlusion"]["image_pointing"] for r in records]
    assert result["table"]["perturbation.occlusion"]["image_pointing"]["mean"] == pytest.approx(np.mean(hits))
    # a trained model answers from the evidence picture: occlusion finds it far above the random floor
    assert np.mean(hits) >= 0.8 and all(r["correct"] for r in records)


def test_an_explainer_that_warns_is_counted_in_the_table_and_the_trust_page():
    """Integrated gradients on two path points misses most of the log-probability change on the demo's
    picture questions and says so; the evaluation counts those samples and names the first, so a score
    over maps the explainer does not vouch for is never silent."""
    from xmllm.evaluation.page import trust_page_markdown
    from xmllm.evaluation.table import text_table

    result = xmllm.evaluate("demo", demo_pictures=2, explainers=["gradient.integrated"],
                            params={"gradient.integrated": {"n_steps": 2}}, sanity_samples=0, steps=2)
    warned = result["warnings"]["gradient.integrated"]
    assert 1 <= warned["count"] <= 2
    assert warned["first"].startswith("p0-") and "increase n_steps (now 2)" in warned["first"]
    assert f"warned gradient.integrated: {warned['count']} of 2 sample(s)" in text_table(result)
    page = trust_page_markdown(result)
    assert "warned** on" in page and "--demo-pictures 2 --seed 0" in page and "over two pictures" in page
    assert json.loads(json.dumps(result))["warnings"] == result["warnings"]
