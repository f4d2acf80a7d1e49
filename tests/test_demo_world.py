"""The synthetic world: determinism, ground truth that matches the pixels, pairs and edits."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from xmllm.explainers.demo.questions import NUMBER_WORDS, QUESTION_TYPES
from xmllm.explainers.demo.samples import counterfactuals, generate_sample, generate_samples, make_pair
from xmllm.explainers.demo.world import COLOURS, Obj, Scene, relation
from xmllm.samples import SampleSetError, read_sample_set
from xmllm.cli import main


def test_same_seed_same_samples_and_pixels():
    a, b = generate_samples(20, 7), generate_samples(20, 7)
    assert [s.text for s in a] == [s.text for s in b]
    assert all(np.array_equal(np.asarray(x.image()), np.asarray(y.image())) for x, y in zip(a, b))
    c = generate_samples(20, 8)
    assert [s.text for s in a] != [s.text for s in c]


def test_training_stream_differs_from_user_seeds():
    user = generate_sample(3, 5)
    train = generate_sample(3, 5, stream=(0x7A117EA1,))
    assert (user.text, user.scene) != (train.text, train.scene)


def test_question_types_cycle_and_answers_are_balanced():
    samples = generate_samples(500, 1)
    assert [s.question_type for s in samples[:5]] == list(QUESTION_TYPES)
    counts = {t: {} for t in QUESTION_TYPES}
    for s in samples:
        counts[s.question_type][s.answer] = counts[s.question_type].get(s.answer, 0) + 1
    assert set(counts["colour"]) == set(COLOURS)
    assert set(counts["count"]) == set(NUMBER_WORDS)
    assert set(counts["presence"]) == {"yes", "no"}
    assert set(counts["position"]) == {"left", "right", "above", "below"}
    for qtype, hist in counts.items():  # no answer dominates its question type
        assert max(hist.values()) / sum(hist.values()) < 0.65, (qtype, hist)


def test_mask_is_the_pixels_of_the_objects_the_answer_depends_on():
    for s in generate_samples(50, 2):
        img = np.asarray(s.image()).astype(int)
        mask = s.mask()
        if s.question_type in ("colour", "shape"):
            (i,) = s.grounding
            rgb = np.array(COLOURS[s.scene.objects[i].colour])
            inside = np.abs(img[mask] - rgb).sum(axis=1)
            assert np.median(inside) < 10  # the masked pixels are the object's colour
            assert mask.sum() > 100
        if s.question_type == "presence" and s.answer == "no":
            assert not mask.any()


def test_answers_follow_the_scene():
    circle = Obj("circle", "red", 30, 64, 24)
    square = Obj("square", "blue", 96, 64, 24)
    scene = Scene((circle, square))
    assert relation(circle, square) == "left"
    assert relation(square, circle) == "right"
    assert relation(Obj("circle", "red", 60, 20, 24), Obj("square", "blue", 64, 100, 24)) == "above"
    assert relation(Obj("circle", "red", 20, 20, 24), Obj("square", "blue", 100, 100, 24)) is None  # diagonal
    colour_q = QUESTION_TYPES["colour"]._question(np.random.default_rng(0), shape="circle")
    assert colour_q.answer(scene) == "red"
    assert colour_q.answer(scene.with_object(0, colour="green")) == "green"
    assert colour_q.answer(scene.without(0)) is None  # ill-posed: no circle


def test_pairs_change_one_detail_and_the_answer():
    made = 0
    for s in generate_samples(60, 3):
        partner = make_pair(s)
        if partner is None:
            continue
        made += 1
        assert partner.answer != s.answer
        assert partner.question == s.question
        assert partner.pair == s.id and s.pair == partner.id
        assert partner.edit
    assert made >= 50


def test_counterfactual_edits_recompute_answers():
    s = generate_samples(1, 4)[0]  # a colour question
    edits = {e.id.rsplit("-", 1)[1]: e for e in counterfactuals(s)}
    assert {"recolour", "move"} <= set(edits)
    assert edits["recolour"].answer != s.answer
    assert edits["move"].answer == s.answer
    rephrased = [e for k, e in edits.items() if k.startswith("rephrase")]
    assert rephrased and all(e.text != s.text and e.answer == s.answer for e in rephrased)


def test_cli_writes_a_sample_set_that_reads_back(tmp_path, capsys):
    out = tmp_path / "set"
    assert main(["demo", "samples", "--n", "6", "--seed", "5", "--out", str(out), "--pairs"]) == 0
    records = read_sample_set(out / "samples.jsonl")
    assert len(records) >= 10
    first = records[0]
    expected = generate_sample(5, 0)
    assert ((first.id, first.question, first.answer, first.question_type)
            == (expected.id, expected.text, expected.answer, expected.question_type))
    assert np.array_equal(np.asarray(first.load_image()), np.asarray(expected.image()))
    assert np.array_equal(first.load_mask(), expected.mask())
    assert first.pair == records[1].id
    raw = json.loads((out / "samples.jsonl").read_text().splitlines()[0])
    assert raw["image"] == f"images/{first.id}.png"  # relative to the folder
    assert raw["question_type"] == expected.question_type and "family" not in raw


def test_a_sample_set_of_xmllm_0_2_reads_its_question_type_from_family(tmp_path):
    """Sets written before the rename name the question type ``family``: read as ``question_type``,
    into the ground truth that explainers read (``extra['question_type']``), not left as an extra."""
    from xmllm.evaluation.samples import jsonl_samples
    from xmllm.explainers.demo.groundtruth import demo_sample_from

    out = tmp_path / "set"
    assert main(["demo", "samples", "--n", "3", "--seed", "2", "--out", str(out)]) == 0
    lines = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    old = [{("family" if k == "question_type" else k): v for k, v in rec.items()} for rec in lines]
    (out / "samples.jsonl").write_text("".join(json.dumps(rec) + "\n" for rec in old))
    records = read_sample_set(out / "samples.jsonl")
    assert [r.question_type for r in records] == [rec["question_type"] for rec in lines]
    assert all("family" not in r.extra for r in records)
    samples = jsonl_samples(out / "samples.jsonl")
    assert [s.extra["question_type"] for s in samples] == [rec["question_type"] for rec in lines]
    assert all(demo_sample_from(s) is not None for s in samples)  # the demo ground truth is whole


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    assert main(["demo", "samples", "--n", "0", "--out", str(tmp_path)]) == 2
    assert "--n must be a positive integer" in capsys.readouterr().err
    assert main(["demo", "samples", "--n", "2", "--question-types", "colour,smell", "--out", str(tmp_path)]) == 2
    assert "--question-types: unknown question type 'smell'" in capsys.readouterr().err


def _write(tmp_path, lines):
    path = tmp_path / "samples.jsonl"
    path.write_text("\n".join(json.dumps(l) if not isinstance(l, str) else l for l in lines) + "\n")
    return path


def test_sample_set_errors_are_one_line_and_name_the_line(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    ok = {"id": "a", "image": "a.png", "question": "What colour is the circle?"}
    cases = [
        ([ok, {**ok, "id": "a"}], ":2: duplicate sample id 'a'"),
        ([{**ok, "question": ""}], ":1: field 'question' must be a non-empty string"),
        ([{**ok, "image": "../outside.png"}], ":1: field 'image' leaves the sample set's folder"),
        ([{**ok, "image": "/etc/passwd"}], ":1: field 'image' is an absolute path"),
        (["{not json"], ":1: not valid JSON"),
        ([{**ok, "answer": 3}], ":1: field 'answer' must be a string"),
        ([{**ok, "family": "colour", "question_type": "count"}],
         ":1: fields 'family' (the old name of 'question_type') and 'question_type' differ"),
    ]
    for lines, message in cases:
        with pytest.raises(SampleSetError) as err:
            read_sample_set(_write(tmp_path, lines))
        assert message in str(err.value) and "\n" not in str(err.value)
    assert read_sample_set(_write(tmp_path, [{**ok, "image": "/etc/hostname"}]), allow_absolute=True)
