"""The minimal flipping set, checked by forwards masked by hand on the demo model.

A set is only an explanation if it does what it claims: masking it (by the model's own patch
geometry and a black pixel's normalisation, or the unk token for words, computed here, not by
the explainer's helpers) must change the greedy first answer token, and unmasking any single
member must bring the answer back. The keep-only probability must be a real forward too.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch


from loaded_models import TINY_QUESTION, demo_prepared, occlude_by_hand, tiny_prepared
from tiny_models import FAMILIES

from xmllm.explainers.prepared import Prepared
from xmllm.explainers.methods.causal import MinimalSet

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SEARCH_LIMIT = 16
"""Cells the search may use on the demo model: keeps a sample that never flips cheap."""
DEMO_CASES = (("colour", 0), ("colour", 1), ("colour", 2), ("shape", 0))
PROB_ATOL = 1e-4


@torch.no_grad()
def first_token(prep: Prepared, cells: list[tuple[int, int]], words: list[int]) -> torch.Tensor:
    """Probabilities of the first answer token's slot with ``cells`` blacked out and ``words``
    (positions) replaced by unk, from one plain forward."""
    ids = prep.inputs["input_ids"].clone()
    ids[0, words] = prep.loaded.processor.tokenizer.unk_token_id
    logits = prep.model(**{**dict(prep.inputs), "input_ids": ids,
                           "pixel_values": occlude_by_hand(prep, cells)}).logits
    return torch.softmax(logits[0, int(prep.logit_positions[0])].float(), dim=-1)


def question_positions_by_hand(prep: Prepared) -> list[int]:
    """Where the question's token ids sit in the prompt (the demo tokenizer is word-level)."""
    tokenizer = prep.loaded.processor.tokenizer
    question = tokenizer(prep.sample.question, add_special_tokens=False)["input_ids"]
    ids = prep.inputs["input_ids"][0].tolist()
    starts = [i for i in range(len(ids)) if ids[i : i + len(question)] == question]
    assert len(starts) == 1
    return list(range(starts[0], starts[0] + len(question)))


def check_verified(prep: Prepared, exp) -> None:
    """The set flips the answer, every single member is needed, and the scores are real."""
    answer = prep.answer.token_ids[0]
    cells = [tuple(c) for c in exp.meta["set"]["cells"]]
    words = [w["position"] for w in exp.meta["set"]["words"]]
    masked = first_token(prep, cells, words)
    assert int(masked.argmax()) != answer, "masking the set must change the greedy first token"
    assert float(masked[answer]) == pytest.approx(exp.scores["prob_masked"], abs=PROB_ATOL)
    for cell in cells:
        assert int(first_token(prep, [c for c in cells if c != cell], words).argmax()) == answer, cell
    for word in words:
        assert int(first_token(prep, cells, [w for w in words if w != word]).argmax()) == answer, word
    grid = prep.layouts[0].main_grid
    expected = np.zeros((grid.rows, grid.cols))
    for r, c in cells:
        expected[r, c] = 1
    np.testing.assert_array_equal(exp.maps["image"], expected)
    assert exp.scores["set_size"] == len(cells) + len(words) and exp.scores["flipped"] == 1.0
    everything = [(r, c) for r in range(grid.rows) for c in range(grid.cols)]
    question_words = question_positions_by_hand(prep) if exp.params["include_text"] else []
    keep_only = first_token(prep, [c for c in everything if c not in cells], [w for w in question_words if w not in words])
    assert float(keep_only[answer]) == pytest.approx(exp.scores["prob_keep_only"], abs=PROB_ATOL)
    assert exp.scores["keep_only_preserved"] == float(int(keep_only.argmax()) == answer)


def test_minimal_image_set_flips_and_every_member_is_needed(demo):
    flipped = 0
    for qtype, index in DEMO_CASES:
        prep = demo_prepared(demo, index, qtype)
        exp = MinimalSet().explain(demo, prep, max_cells=SEARCH_LIMIT, regenerate=False)
        assert exp.axes["image"] == ("row", "col")
        if exp.scores["flipped"]:
            flipped += 1
            check_verified(prep, exp)
        else:  # no flip: no set, and masking every cell tried really keeps the answer
            assert exp.scores["set_size"] == 0 and not exp.maps["image"].any()
            assert exp.meta["status"].startswith("no flip")
            tried = [tuple(c) for c in exp.meta["tried"]["cells"]]
            assert len(tried) == SEARCH_LIMIT
            masked = first_token(prep, tried, [])
            assert int(masked.argmax()) == prep.answer.token_ids[0]
            assert float(masked[prep.answer.token_ids[0]]) == pytest.approx(exp.scores["prob_masked"], abs=PROB_ATOL)
    assert flipped, "no demo sample's answer flipped: the search found nothing to verify"


def test_minimal_set_with_question_words(demo):
    prep = demo_prepared(demo, 0, "shape")
    exp = MinimalSet().explain(demo, prep, include_text=True, max_cells=SEARCH_LIMIT, regenerate=True)
    assert exp.axes["prompt"] == ("prompt_token",) and exp.maps["prompt"].shape == (len(prep.text_positions),)
    assert exp.scores["flipped"] == 1.0
    check_verified(prep, exp)
    # the regenerated answer under the mask starts with the new top token (word-level tokenizer)
    assert exp.meta["answer_masked"].split()[0] == exp.meta["new_top_token"]


def test_gradient_ranking_gives_a_verified_set(demo):
    prep = demo_prepared(demo, 1, "colour")
    exp = MinimalSet().explain(demo, prep, rank_by="gradient", max_cells=SEARCH_LIMIT, regenerate=False)
    assert exp.params["rank_by"] == "gradient" and len(exp.meta["ranking"]) == SEARCH_LIMIT
    if exp.scores["flipped"]:
        check_verified(prep, exp)


def test_bad_parameters(demo):
    prep = demo_prepared(demo)
    for params, fragment in (({"max_cells": 0}, "max_cells=0"), ({"rank_by": "attention"}, "rank_by='attention'"),
                             ({"include_text": "yes"}, "include_text='yes'")):
        with pytest.raises(ValueError, match=fragment):
            MinimalSet().explain(demo, prep, **params)


@pytest.mark.parametrize("family", FAMILIES)
def test_minimal_set_runs_on_every_family(family):
    prep = tiny_prepared(family, TINY_QUESTION)
    grid = prep.layouts[0].main_grid
    for params in ({"max_cells": 4}, {"max_cells": 4, "rank_by": "gradient", "include_text": True,
                                      "regenerate": False}):
        exp = MinimalSet().explain(prep.loaded, prep, **params)
        assert exp.maps["image"].shape == (grid.rows, grid.cols)
        assert set(np.unique(exp.maps["image"])) <= {0.0, 1.0}
        assert exp.scores["set_size"] <= 4 and (exp.scores["set_size"] > 0) == bool(exp.scores["flipped"])
        for key in ("prob_original", "prob_masked", "prob_keep_only"):
            assert 0.0 <= exp.scores[key] <= 1.0
        assert isinstance(exp.meta.get("answer_masked", ""), str)
