"""Two images on every tiny family (#25 item 5): each picture gets its own layout, the positions are
the image tokens and count the model's features, a cell of the second picture reaches the decoder
at its own position only, and occlusion maps both pictures; a family that takes one picture refuses
the second in one line."""
from __future__ import annotations

import os

import pytest
import torch
from feature_positions import feature_positions
from loaded_models import TINY_QUESTION, tiny_loaded
from tiny_models import ALL_FAMILIES, TEST_IMAGE_SIZES, tiny_image

from xmllm import XmllmError
from xmllm.explainers.answering import generate_answer
from xmllm.explainers.models.cell_check import check_cell_positions
from xmllm.explainers.prepared import ExplainSample, prepare
from xmllm.pipeline import make_plan, run_plan

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

FAST_FAMILIES = ("llava", "qwen2_vl", "idefics3", "llava_onevision", "internvl")
"""The default suite's families (about 30 s); every family with XMLLM_FAMILY_MATRIX=1 (about 1 min,
the CI's matrix step)."""
FAMILIES = ALL_FAMILIES if os.environ.get("XMLLM_FAMILY_MATRIX") == "1" else [f for f in ALL_FAMILIES if f in FAST_FAMILIES]


def two_inputs(family: str):
    loaded = tiny_loaded(family)
    size = TEST_IMAGE_SIZES[family]
    pictures = [tiny_image(*size), tiny_image(*size, seed=1)]
    try:
        inputs, _ = loaded.adapter.build_inputs(pictures, TINY_QUESTION)
    except (XmllmError, ValueError) as exc:  # a family that takes one picture says so in one line
        message = str(exc)
        assert message.strip() and "\n" not in message, (family, message)
        pytest.skip(f"{family} takes one picture: {message}")
    return loaded, pictures, inputs


@pytest.mark.parametrize("family", FAMILIES)
def test_two_pictures_two_layouts_at_the_image_tokens(family):
    loaded, _, inputs = two_inputs(family)
    adapter = loaded.adapter
    layouts = adapter.image_layouts(inputs)
    assert [layout.image_index for layout in layouts] == [0, 1]
    positions = torch.cat([layout.all_positions for layout in layouts])
    expected, features = feature_positions(loaded, inputs)
    assert torch.equal(torch.sort(positions).values, expected)  # pictures in order, each sorted
    assert features == expected.numel()
    if not adapter.lacks("pixel_cells"):
        assert check_cell_positions(adapter, inputs) == []  # first, middle and last cell of every grid, both pictures


@pytest.mark.parametrize("family", FAMILIES)
def test_occlusion_maps_both_pictures(family):
    loaded, pictures, _ = two_inputs(family)
    if loaded.adapter.lacks("pixel_cells"):
        pytest.skip(loaded.adapter.lacks("pixel_cells"))
    answer = generate_answer(loaded, pictures, TINY_QUESTION, max_new_tokens=2)
    prepared = prepare(loaded, ExplainSample(pictures, TINY_QUESTION, id=f"tiny-{family}-two"), answer=answer)
    (outcome,) = list(run_plan(loaded, prepared, make_plan(["perturbation.occlusion"])))
    exp = outcome.explanation
    assert exp is not None, outcome.skipped
    second = [name for name in exp.maps if name.startswith("image1.") and name.endswith(".answer")]
    assert "image.answer" in exp.maps and len(second) == 1
    assert {"image_drop.1", "image_drop.2"} <= set(exp.scores)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_video_goes_in_as_frames(family, tmp_path):
    """transformers' video processors need torchvision (not loadable here); every family that takes
    several pictures takes a clip's frames as pictures."""
    av = pytest.importorskip("av", reason="PyAV (the video extra) is not installed")
    import numpy as np

    import xmllm

    loaded, pictures, _ = two_inputs(family)
    clip = tmp_path / "clip.mp4"
    width, height = (size - size % 2 for size in pictures[0].size)  # the codec wants even sides
    with av.open(str(clip), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for k in range(4):
            pixels = np.asarray(pictures[k % 2].convert("RGB").resize((width, height)))
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    run = None
    for eid in ("gradient.saliency", "lens.logit", "attention.raw"):  # the first this family runs
        try:
            run = xmllm.explain(loaded, question=TINY_QUESTION, video=clip, frames=2, explainers=[eid],
                                max_new_tokens=2, faithfulness=False)
            break
        except XmllmError as exc:  # a declared refusal, or a context that holds fewer frames: one line
            assert "\n" not in str(exc)
            if "frame" in str(exc) and not str(exc).startswith(eid):
                pytest.skip(str(exc))
    assert run is not None, family
    assert [f["index"] for f in run.manifest["video"]["frames"]] == [1, 3]
    assert [layout["image"] for layout in run.manifest["layouts"]] == [0, 1]
