"""Counterfactual edits against the model's real greedy answers on edited images.

Each edited scene is checked against the original (only the asked-about object changes, and only
in the way the row says), the right answer is recomputed from the world's question, and the
model's answer and its probability come from a plain ``generate`` with the processor run here,
not from the explainer's helpers.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch


from loaded_models import TINY_QUESTION, random_demo_folder, tiny_loaded, tiny_prepared
from tiny_models import FAMILIES

from xmllm.explainers.answering import normalise
from xmllm.explainers.prepared import ExplainSample, prepare
from xmllm.explainers.demo.samples import QUESTION_TYPE_NAMES, generate_samples, to_explain_sample
from xmllm.explainers.demo.world import Scene
from xmllm.explainers.demo.groundtruth import demo_sample_from, parse_question
from xmllm.explainers.methods.data import Counterfactual
from xmllm.explainers.models import load_model
from xmllm.explainers.registry import get_explainer

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    folder = random_demo_folder(tmp_path_factory.mktemp("counterfactual"), 0)
    return load_model(folder, device="cpu", dtype="float32")


@torch.no_grad()
def greedy_by_hand(loaded, image, question: str) -> tuple[str, float]:
    """The model's greedy answer through the processor and ``generate``, and its joint probability."""
    processor = loaded.processor
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    bos = processor.tokenizer.bos_token
    extra = {"add_special_tokens": False} if bos and prompt.startswith(bos) else {}
    inputs = processor(text=prompt, images=[image], return_tensors="pt", **extra)
    limit = loaded.model.generation_config.max_new_tokens or 32
    out = loaded.model.generate(**inputs, do_sample=False, max_new_tokens=limit, output_scores=True,
                                return_dict_in_generate=True)
    special = set(processor.tokenizer.all_special_ids)
    ids, logp = [], 0.0
    for step, tid in enumerate(out.sequences[0, inputs["input_ids"].shape[1]:].tolist()):
        if tid in special:
            break
        ids.append(tid)
        logp += math.log(float(torch.softmax(out.scores[step][0].float(), -1)[tid]))
    return processor.tokenizer.decode(ids, skip_special_tokens=True).strip(), math.exp(logp) if ids else 0.0


def changed_fields(before: list[dict], after: list[dict]) -> list[tuple[int, set[str]]]:
    """For scenes of equal length, which object changed in which fields."""
    return [(i, {k for k in a if a[k] != b[k]}) for i, (a, b) in enumerate(zip(before, after)) if a != b]


def test_every_demo_question_is_read_back_from_its_wording():
    for sample in generate_samples(40, 7, question_types=[*QUESTION_TYPE_NAMES, "describe"]):
        assert parse_question(sample.question_type, sample.text) == sample.question
        rebuilt = demo_sample_from(to_explain_sample(sample))
        assert rebuilt.question == sample.question and rebuilt.answer == sample.answer
    with pytest.raises(ValueError, match="not one of the wordings of the demo question type 'colour'"):
        parse_question("colour", "What colour is the hexagon?")


@pytest.mark.parametrize("qtype", ["colour", "presence", "count"])
def test_table_answers_are_the_models_greedy_answers_on_the_edited_images(demo, qtype):
    sample = generate_samples(2, 0, question_types=[qtype])[1]
    explain_sample = to_explain_sample(sample)
    prep = prepare(demo, explain_sample)
    exp = Counterfactual().explain(demo, prep)
    rows = exp.meta["rows"]
    assert rows[0]["kind"] == "original" and rows[0]["answer"] == prep.answer.text
    assert exp.axes["prob"] == ("edit",) and exp.maps["prob"].shape == (len(rows),)
    assert len(exp.meta["edit_labels"]) == len(rows) and exp.meta["edit_labels"][0] == "original"
    original = sample.scene.to_json()
    grounded = sample.grounding[0] if sample.grounding else None
    kinds = set()
    for k, row in enumerate(rows[1:], start=1):
        kinds.add(row["kind"])
        if "objects" in row:
            scene = Scene.from_json(row["objects"])
            after = row["objects"]
            if row["kind"] == "recolour":
                assert changed_fields(original, after) == [(grounded, {"colour"})]
            elif row["kind"] == "move":
                assert changed_fields(original, after) == [(grounded, {"cx", "cy"})]
            elif row["kind"] == "remove":
                assert after == original[:grounded] + original[grounded + 1:]
            image, question = scene.render(), row["question"]
            assert question == sample.text
        else:
            assert row["kind"] == "rephrase" and row["question"] != sample.text
            scene, image, question = sample.scene, sample.image(), row["question"]
        expected = parse_question(qtype, question).answer(scene)
        assert row["expected"] == expected
        answer, prob = greedy_by_hand(demo, image, question)
        assert row["answer"] == answer
        assert exp.maps["prob"][k] == pytest.approx(prob, rel=1e-4)
        assert bool(exp.maps["flipped"][k]) == (normalise(answer) != normalise(prep.answer.text))
        assert bool(exp.maps["correct"][k]) == (normalise(answer) == normalise(expected))
        assert bool(exp.maps["expected_flip"][k]) == (normalise(expected) != normalise(sample.answer))
    assert "rephrase" in kinds and kinds & {"recolour", "move", "remove", "flip"}
    edits = rows[1:]
    assert exp.scores["flip_rate"] == pytest.approx(np.mean([r["flipped"] for r in edits]))
    assert exp.scores["consistency"] == pytest.approx(np.mean([r["flipped"] == r["expected_flip"] for r in edits]))


def test_prob_original_is_the_original_answer_forced_on_each_edit(demo):
    sample = to_explain_sample(generate_samples(1, 0, question_types=["shape"])[0])
    prep = prepare(demo, sample)
    exp = Counterfactual().explain(demo, prep, seed=1)
    assert exp.params["seed"] == 1
    for k, row in enumerate(exp.meta["rows"]):
        image = Scene.from_json(row["objects"]).render() if "objects" in row else sample.images[0]
        forced = prepare(demo, ExplainSample([image], row["question"]), answer=prep.answer)
        with torch.no_grad():
            logits = forced.model(**dict(forced.inputs)).logits[0].float()
        logp = torch.log_softmax(logits[forced.logit_positions], -1)
        p = float(logp[torch.arange(len(prep.answer.token_ids)), torch.tensor(prep.answer.token_ids)].sum().exp())
        assert exp.maps["prob_original"][k] == pytest.approx(p, rel=1e-4)


def test_samples_without_ground_truth_need_rephrasings(demo):
    sample = to_explain_sample(generate_samples(1, 0, question_types=["colour"])[0])
    bare = ExplainSample(sample.images, sample.question, id="bare", expected=sample.expected)
    with pytest.raises(ValueError, match="rephrasings") as info:
        Counterfactual().explain(demo, bare)
    assert "\n" not in str(info.value)
    exp = Counterfactual().explain(demo, bare, rephrasings=["Which colour does the square have?"])
    row = exp.meta["rows"][1]
    assert exp.meta["source"] == "rephrasings" and row["expected"] == sample.expected
    assert row["answer"] == greedy_by_hand(demo, sample.images[0], "Which colour does the square have?")[0]
    for params, fragment in (({"rephrasings": "again?"}, r"rephrasings='again\?' must be a list of strings"),
                             ({"rephrasings": [" "]}, "non-empty"), ({"colour": "red"}, "unknown parameter")):
        with pytest.raises(ValueError, match=fragment):
            Counterfactual().explain(demo, bare, **params)


@pytest.mark.parametrize("family", FAMILIES)
def test_rephrasings_run_on_every_family(family):
    prep = tiny_prepared(family, TINY_QUESTION, tokens=2, seed=0)
    loaded = tiny_loaded(family)
    exp = get_explainer("data.counterfactual")().explain(loaded, prep, rephrasings=["what colour is the circle"])
    assert exp.maps["prob"].shape == (2,) and np.isnan(exp.maps["correct"]).all()  # no expected answer
    row = exp.meta["rows"][1]
    answer, prob = greedy_by_hand(loaded, prep.sample.images[0], "what colour is the circle")
    assert row["answer"] == answer and exp.maps["prob"][1] == pytest.approx(prob, rel=1e-4)
