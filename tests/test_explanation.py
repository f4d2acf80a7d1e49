"""The explanation contract: named arrays with named axes that save and load exactly."""
from __future__ import annotations

import json

import numpy as np
import pytest

from xmllm.explainers.explanation import Explanation, Target, load_explanations, save_explanations
from xmllm.runner import parse_params
from xmllm import XmllmError


def _target() -> Target:
    return Target(text="red red", token_ids=[7, 7], tokens=["red", "red"], positions=[80, 81], probs=[0.9, 0.8],
                  prompt_positions=[0, 1, 2], prompt_tokens=["<s>", "what", "?"])


def test_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    e = Explanation("x.one", {"window": 2, "baseline": "black"}, _target(), scores={"auc": 0.25}, meta={"note": "<b>"})
    e.add("image", rng.random((2, 8, 8)).astype(np.float32), ("answer_token", "row", "col"))
    e.add("prompt", rng.random((2, 3)), ("answer_token", "prompt_token"))
    e.save(tmp_path / "one")
    back = Explanation.load(tmp_path / "one")
    assert back.target == e.target and back.params == e.params and back.scores == e.scores and back.meta == e.meta
    for name, arr in e.maps.items():
        assert back.maps[name].dtype == arr.dtype and np.array_equal(back.maps[name], arr)
        assert back.axes[name] == e.axes[name]
    assert set(back.image_maps()) == {"image"}
    # a repeated answer token keeps its own row: positions, not strings, address tokens
    assert back.target.positions == [80, 81] and back.maps["image"].shape[0] == 2


def test_dotted_stem_keeps_its_dots(tmp_path):
    """``run/attention.raw`` must not become ``run/attention.npz`` (Path.with_suffix would)."""
    a = Explanation("attention.raw", {}, _target())
    a.add("image", np.ones((8, 8)), ("row", "col"))
    b = Explanation("attention.rollout", {}, _target())
    b.add("image", np.zeros((8, 8)), ("row", "col"))
    a.save(tmp_path / "attention.raw")
    b.save(tmp_path / "attention.rollout")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "attention.raw.json", "attention.raw.npz", "attention.rollout.json", "attention.rollout.npz"]
    assert Explanation.load(tmp_path / "attention.raw").explainer == "attention.raw"
    assert Explanation.load(tmp_path / "attention.rollout.npz").maps["image"].sum() == 0


def test_many_in_one_file_and_no_half_written_output(tmp_path):
    a = Explanation("a.x", {}, _target())
    a.add("image", np.ones((8, 8)), ("row", "col"))
    b = Explanation("b.y", {}, _target())
    b.add("image", np.zeros((8, 8)), ("row", "col"))
    save_explanations([a, b], tmp_path / "e.npz", tmp_path / "m.json", extra={"seed": 3})
    assert json.loads((tmp_path / "m.json").read_text())["seed"] == 3
    loaded = load_explanations(tmp_path / "e.npz", tmp_path / "m.json")
    assert [x.explainer for x in loaded] == ["a.x", "b.y"] and loaded[0].maps["image"].sum() == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.npz", "m.json"]  # no temporary files left
    bad = Explanation("c.z", {"f": object()}, _target())
    with pytest.raises(TypeError):
        save_explanations([bad], tmp_path / "e2.npz", tmp_path / "m2.json")
    assert not (tmp_path / "m2.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_axes_must_match_dimensions():
    e = Explanation("x.one", {}, _target())
    with pytest.raises(ValueError, match="has 2 dims but axes"):
        e.add("image", np.ones((8, 8)), ("answer_token", "row", "col"))


def test_parse_params():
    assert parse_params(["perturbation.occlusion.window=2", "gradient.integrated.baseline=blur"]) == {
        "perturbation.occlusion": {"window": 2}, "gradient.integrated": {"baseline": "blur"}}
    with pytest.raises(XmllmError, match="expected EXPLAINER.NAME=VALUE"):
        parse_params(["window=2"])
