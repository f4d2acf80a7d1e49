"""The demo world's questions over several pictures and clips: ground truth, edits, sample sets,
the chat template's picture markers and the grown vocabulary."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import torch
import pytest

from xmllm.explainers.demo.pictures import CLIP_FRAMES, ORDINALS, PICTURE_QUESTION_TYPES, Pictures
from xmllm.explainers.demo.samples import (
    PICTURE_TYPE_NAMES,
    generate_picture_samples,
    generate_sample,
    make_pair,
    to_explain_sample,
    write_sample_set,
)


@pytest.mark.parametrize("name", list(PICTURE_QUESTION_TYPES))
def test_every_picture_question_has_one_answer_balanced_and_grounded(name):
    samples = [generate_sample(3, i, name) for i in range(160)]
    answers = Counter(s.answer for s in samples)
    assert len(answers) >= 3 if name != "which_picture" else set(answers) == {"first", "second"}
    assert max(answers.values()) <= (0.6 if len(answers) == 2 else 0.4) * len(samples), answers  # no prior wins
    for s in samples:
        assert s.several and len(s.images()) == PICTURE_QUESTION_TYPES[name].pictures
        assert s.question.answer(s.scene) == s.answer
        masks = s.masks()
        assert masks.shape == (len(s.images()), 128, 128)
        held = sorted({p for p, _ in s.grounding})
        assert [k for k in range(len(masks)) if masks[k].any()] == held  # a mask where the evidence is
        if name in ("which_picture", "which_frame"):
            assert s.evidence_image == ORDINALS.index(s.answer) + 1
        if name == "motion":
            assert held == list(range(CLIP_FRAMES)) and s.evidence_image is None


def test_a_count_over_both_pictures_adds_them_up():
    for s in [generate_sample(4, i, "count_pictures") for i in range(100)]:
        slot = s.question.slot
        per_picture = [len(scene.find(colour=slot.get("colour"), shape=slot.get("shape"))) for scene in s.scene.scenes]
        assert ["zero", "one", "two", "three", "four"].index(s.answer) == sum(per_picture)
        assert s.evidence_image == (1 + per_picture.index(max(per_picture)) if sum(x > 0 for x in per_picture) == 1
                                    else None)


def test_motion_is_a_straight_move_past_still_objects():
    s = next(s for s in (generate_sample(5, i, "motion") for i in range(40)) if s.answer == "left")
    paths = [scene.objects[i] for (_, i), scene in zip(s.grounding, s.scene.scenes)]
    assert paths[0].cx - paths[-1].cx >= 30
    still = [[o for j, o in enumerate(scene.objects) if (k, j) not in s.grounding] for k, scene in enumerate(s.scene.scenes)]
    assert still[0] == still[1] == still[2]
    partner = make_pair(s)
    assert partner is not None and partner.answer == "right" and partner.edit == "play the clip backwards"


@pytest.mark.parametrize("name", list(PICTURE_QUESTION_TYPES))
def test_the_pair_changes_one_detail_and_the_answer(name):
    made = 0
    for i in range(20):
        s = generate_sample(6, i, name)
        partner = make_pair(s)
        if partner is None:
            continue
        made += 1
        assert partner.answer != s.answer and partner.answer == partner.question.answer(partner.scene)
        assert len(partner.scene.scenes) == len(s.scene.scenes)
    assert made >= 15


def test_picture_samples_keep_their_own_draws_and_ids():
    single, several = generate_sample(0, 0, "colour"), generate_sample(0, 0, "which_picture")
    assert single.id == "s0-00000" and several.id == "p0-00000"
    assert [s.question_type for s in generate_picture_samples(8, 1)] == list(PICTURE_TYPE_NAMES) * 2
    assert generate_sample(0, 7, "motion").scene == generate_sample(0, 7, "motion").scene


def test_sample_set_of_pictures_round_trips(tmp_path):
    from xmllm.evaluation import jsonl_samples
    from xmllm.explainers.demo.groundtruth import demo_sample_from

    samples = generate_picture_samples(8, 2)
    path = write_sample_set(samples, tmp_path / "set", progress=False)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    back = jsonl_samples(path)
    for s, rec, loaded in zip(samples, records, back):
        assert isinstance(rec["image"], list) and len(rec["image"]) == len(s.images())
        assert rec.get("evidence_image") == s.evidence_image
        assert [np.asarray(a).tolist() == np.asarray(b).tolist() for a, b in zip(loaded.images, s.images())] \
            == [True] * len(s.images())
        if s.evidence_image:  # the mask is the evidence picture's
            assert np.array_equal(loaded.mask, s.masks()[s.evidence_image - 1])
        else:
            assert "mask" not in rec and loaded.mask is None
        rebuilt = demo_sample_from(to_explain_sample(s))
        assert isinstance(rebuilt.scene, Pictures) and rebuilt.scene.to_json() == s.scene.to_json()
        assert rebuilt.answer == s.answer == rebuilt.question.answer(rebuilt.scene)


def test_chat_template_marks_each_of_several_pictures_and_keeps_one_picture_as_it_was():
    from xmllm.explainers.demo.model import build_processor

    processor = build_processor()

    def prompt(n: int) -> str:
        content = [*({"type": "image"} for _ in range(n)), {"type": "text", "text": "Which frame shows the red circle?"}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    assert prompt(1) == "USER: Which frame shows the red circle?\n<image> ASSISTANT:"
    assert prompt(3) == ("USER: Which frame shows the red circle?\nfirst <image>\nsecond <image>\nthird <image> "
                         "ASSISTANT:")


def test_the_grown_vocabulary_keeps_every_earlier_word_id():
    from xmllm.explainers.demo.model import build_tokenizer

    before, after = build_tokenizer(pictures=False).get_vocab(), build_tokenizer().get_vocab()
    assert all(after[w] == i for w, i in before.items())
    new = sorted(set(after) - set(before), key=after.get)
    assert {"first", "second", "third", "up", "down", "frame", "picture", "pictures"} <= set(new)
    assert [after[w] for w in new] == list(range(len(before), len(after)))


@pytest.fixture(scope="module")
def demo():
    from xmllm.explainers import load_model

    return load_model("demo")


def test_metrics_score_the_evidence_pictures_grid(demo):
    """With the evidence in picture 2, the ground truth is its mask on picture 2's grid (the same cells
    as that picture alone gives), and the faithfulness curves perturb picture 2's tokens only."""
    from xmllm.explainers.masking import scored_layout, scored_map_name, scored_picture
    from xmllm.explainers.metrics.curves import CurveRunner
    from xmllm.explainers.metrics.truth import cell_truth
    from xmllm.explainers.prepared import ExplainSample, prepare

    s = next(s for s in (generate_sample(9, i, "which_picture") for i in range(20)) if s.evidence_image == 2)
    prepared = prepare(demo, to_explain_sample(s))
    assert scored_picture(prepared) == 1 and scored_map_name(prepared) == "image1.image"
    layout = scored_layout(prepared)
    assert layout.image_index == 1
    alone = prepare(demo, ExplainSample([s.images()[1]], "Which picture shows the red circle?", mask=s.masks()[1]))
    truth = cell_truth(prepared)
    assert truth.cells.any() and np.array_equal(truth.cells, cell_truth(alone).cells)
    runner = CurveRunner(prepared, steps=4)
    touched = torch.cat(runner.cells).unique()
    assert set(touched.tolist()) <= set(layout.main_grid.positions.tolist())
    first = prepared.layouts[0].main_grid.positions
    assert not set(touched.tolist()) & set(first.tolist())
