"""Adapters on tiny random models of every family: positions, counts, grids, hooks, inputs.

Each family runs its real processor on a real PIL image and a real forward pass, so the
layouts are checked against what the model itself consumes, not against our own arithmetic.
"""
from __future__ import annotations

import math

import pytest
import torch


from tiny_models import (
    FAMILIES,
    TEST_IMAGE_SIZES,
    VISION_IMAGE_SIZE,
    build_tiny,
    missing_dependency,
    tiny_image,
)

from xmllm.explainers.models import (
    FULL_IMAGE,
    AdapterError,
    ImageLayout,
    ModelAdapter,
    PatchGrid,
    UnsupportedModelError,
    adapter_for,
    supported_model_types,
)

# PaliGemma's processor builds its BC labels with a numpy call that numpy 2 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

QUESTION = "what colour is the square"
ANSWER = "the answer is red"

# What each family's get_image_features needs besides pixel_values.
FEATURE_KWARGS: dict[str, tuple[str, ...]] = {
    "llava_next": ("image_sizes",),
    "qwen2_vl": ("image_grid_thw",),
    "qwen2_5_vl": ("image_grid_thw",),
    "idefics3": ("pixel_attention_mask",),
    "smolvlm": ("pixel_attention_mask",),
}
# Image-feature tokens outside every grid, per family (documented in the adapters).
DOCUMENTED_EXTRAS: dict[str, set[str]] = {"llava_next": {"image_newline"}}

_CACHE: dict[str, tuple] = {}


def tiny(family: str):
    """(model, processor, adapter) for a family, built once per test session."""
    package = missing_dependency(family)
    if package:
        pytest.skip(f"the {family} processor needs {package}, which is not installed")
    if family not in _CACHE:
        model, processor = build_tiny(family)
        _CACHE[family] = (model, processor, adapter_for(model, processor))
    return _CACHE[family]


def image_for(family: str):
    return tiny_image(*TEST_IMAGE_SIZES[family])


def image_token_positions(adapter: ModelAdapter, inputs, row: int = 0) -> torch.Tensor:
    return torch.nonzero(inputs["input_ids"][row] == adapter.image_token_id).flatten()


def feature_count(output) -> int:
    """Number of image-feature vectors in a get_image_features result (tensor or per-image list)."""
    pooled = output.pooler_output
    if torch.is_tensor(pooled):
        return int(pooled.shape[:-1].numel())
    return sum(int(t.shape[:-1].numel()) for t in pooled)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


def test_every_family_has_an_adapter():
    assert set(FAMILIES) <= set(supported_model_types())


def test_image_positions_are_exactly_the_image_tokens(family):
    _model, _processor, adapter = tiny(family)
    inputs, _ = adapter.build_inputs([image_for(family)], QUESTION)
    layouts = adapter.image_layouts(inputs)
    assert len(layouts) == 1 and isinstance(layouts[0], ImageLayout)
    layout = layouts[0]
    expected = image_token_positions(adapter, inputs)
    assert torch.equal(layout.all_positions, expected)
    gridded = torch.cat([g.positions for g in layout.grids])
    extras = torch.cat(list(layout.extra_positions.values())) if layout.extra_positions else gridded[:0]
    assert gridded.numel() + extras.numel() == expected.numel()  # disjoint cover
    assert set(layout.extra_positions) == DOCUMENTED_EXTRAS.get(family, set())
    for grid in layout.grids:
        assert isinstance(grid, PatchGrid) and grid.positions.dtype == torch.long
        assert grid.positions.numel() == grid.rows * grid.cols
        assert bool((grid.positions[1:] > grid.positions[:-1]).all())  # row-major = sequence order
    # text positions: everything attended that is neither an image feature nor an image marker
    text = adapter.text_positions(inputs)
    seq = inputs["input_ids"].shape[1]
    covered = torch.cat([text, expected, layout.marker_positions]).sort().values
    assert torch.equal(covered, torch.arange(seq))


def test_counts_match_processor_and_model_features(family):
    model, processor, adapter = tiny(family)
    inputs, _ = adapter.build_inputs([image_for(family)], QUESTION)
    layout = adapter.image_layouts(inputs)[0]
    grid_total = sum(g.rows * g.cols for g in layout.grids)
    extra_total = sum(v.numel() for v in layout.extra_positions.values())
    placed = image_token_positions(adapter, inputs).numel()
    assert grid_total + extra_total == placed == layout.num_tokens

    width, height = TEST_IMAGE_SIZES[family]
    if hasattr(processor, "_get_num_multimodal_tokens"):
        own = processor._get_num_multimodal_tokens(image_sizes=[(height, width)]).num_image_tokens[0]
        if family in ("idefics3", "smolvlm"):
            # transformers before 5.25 counts the whole replacement (tags, markers, row breaks), from
            # 5.25 the image tokens alone: either way it is one of our two counts
            markers = layout.marker_positions
            assert own in (int(markers[-1] - markers[0] + 1), grid_total + extra_total)
        else:
            assert grid_total + extra_total == own

    extra_kwargs = {k: inputs[k] for k in FEATURE_KWARGS.get(family, ())}
    with torch.no_grad():
        features = model.get_image_features(pixel_values=inputs["pixel_values"], **extra_kwargs)
    assert feature_count(features) == grid_total + extra_total


def _select_best_resolution(height: int, width: int, pinpoints: list[list[int]]) -> tuple[int, int]:
    """LLaVA-NeXT's choice of tile canvas: most effective pixels, then least waste."""
    best, best_effective, best_waste = None, -1, math.inf
    for cand_h, cand_w in pinpoints:
        scale = min(cand_w / width, cand_h / height)
        down_w, down_h = int(width * scale), int(height * scale)
        effective = min(down_w * down_h, width * height)
        waste = cand_w * cand_h - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (cand_h, cand_w), effective, waste
    return best


def test_llava_next_grids_match_independent_arithmetic():
    model, _processor, adapter = tiny("llava_next")
    width, height = TEST_IMAGE_SIZES["llava_next"]
    inputs, _ = adapter.build_inputs([image_for("llava_next")], QUESTION)
    layout = adapter.image_layouts(inputs)[0]
    vision = model.config.vision_config
    side = vision.image_size // vision.patch_size
    canvas_h, canvas_w = _select_best_resolution(height, width, model.config.image_grid_pinpoints)
    rows, cols = canvas_h // vision.image_size * side, canvas_w // vision.image_size * side
    assert canvas_h // vision.image_size * canvas_w // vision.image_size > 1  # really tiled
    if width / height > cols / rows:  # wider than the canvas: padding rows removed
        rows -= 2 * ((rows - int(round(height * cols / width, 7))) // 2)
    else:
        cols -= 2 * ((cols - int(round(width * rows / height, 7))) // 2)
    assert [(g.name, g.rows, g.cols) for g in layout.grids] == [("base", side, side), ("tiles", rows, cols)]
    newlines = layout.extra_positions["image_newline"]
    assert newlines.numel() == rows
    tiles = layout.grid("tiles")
    # each newline closes one row of the tile grid
    assert torch.equal(newlines, tiles.positions.view(rows, cols)[:, -1] + 1)
    assert layout.main_grid.name == "tiles"


def test_qwen_grids_match_independent_arithmetic():
    for family in ("qwen2_vl", "qwen2_5_vl"):
        model, processor, adapter = tiny(family)
        width, height = TEST_IMAGE_SIZES[family]
        inputs, _ = adapter.build_inputs([image_for(family)], QUESTION)
        vision = model.config.vision_config
        merge = vision.spatial_merge_size
        factor = vision.patch_size * merge
        budget = processor.image_processor.size
        # within the pixel budget, resizing only rounds each side to a multiple of the factor
        assert budget["shortest_edge"] <= width * height <= budget["longest_edge"]
        rows, cols = round(height / factor), round(width / factor)
        assert rows != cols
        (grid,) = adapter.image_layouts(inputs)[0].grids
        assert (grid.name, grid.rows, grid.cols) == ("image", rows, cols)
        assert inputs["image_grid_thw"][0].tolist() == [1, rows * merge, cols * merge]


def test_idefics3_tiles_match_independent_arithmetic():
    for family in ("idefics3", "smolvlm"):
        model, processor, adapter = tiny(family)
        width, height = TEST_IMAGE_SIZES[family]
        inputs, _ = adapter.build_inputs([image_for(family)], QUESTION)
        layout = adapter.image_layouts(inputs)[0]
        longest = processor.image_processor.size["longest_edge"]
        tile = processor.image_processor.max_image_size["longest_edge"]
        # resize the longest edge, keep the aspect ratio (even), then round each side up to tiles
        scale = longest / max(width, height)
        resized_w, resized_h = round(width * scale), int(height * scale)
        resized_h += resized_h % 2
        tile_rows, tile_cols = math.ceil(resized_h / tile), math.ceil(resized_w / tile)
        assert tile_rows > 1 and tile_cols > 1 and tile_rows != tile_cols
        vision = model.config.vision_config
        side = vision.image_size // vision.patch_size // model.config.scale_factor
        expected = [f"tile_{r}_{c}" for r in range(1, tile_rows + 1) for c in range(1, tile_cols + 1)] + ["global"]
        assert [g.name for g in layout.grids] == expected
        assert all((g.rows, g.cols) == (side, side) for g in layout.grids)
        assert layout.grid("tile_2_3").region == pytest.approx((0.5, 2 / 3, 1.0, 1.0))
        assert layout.grid("global").region == FULL_IMAGE
        assert layout.main_grid.name == "global"
        # every tile's run is introduced by <fake_token_around_image> and its tag: markers, not text
        assert layout.marker_positions.numel() == 2 * len(expected) + 1
        assert not set(layout.marker_positions.tolist()) & set(adapter.text_positions(inputs).tolist())


@pytest.mark.parametrize("family", ["llava", "paligemma", "gemma3"])
def test_single_view_families_grid_from_config(family):
    model, _processor, adapter = tiny(family)
    inputs, _ = adapter.build_inputs([image_for(family)], QUESTION)
    (grid,) = adapter.image_layouts(inputs)[0].grids
    vision = model.config.vision_config
    if family == "gemma3":
        side = math.isqrt(model.config.mm_tokens_per_image)
    else:
        side = vision.image_size // vision.patch_size
    assert (grid.rows, grid.cols) == (side, side)


def test_hook_points_resolve_and_fire(family):
    model, _processor, adapter = tiny(family)
    points = adapter.hook_points()
    modules = {id(m) for m in model.modules()}
    assert all(isinstance(m, torch.nn.Module) and id(m) in modules for m in points.values())
    n_vision, n_decoder = len(adapter.vision_layers()), len(adapter.decoder_layers())
    assert n_vision >= 1 and n_decoder == model.config.get_text_config().num_hidden_layers
    for i in range(n_vision):
        assert {f"vision.blocks.{i}", f"vision.blocks.{i}.attn"} <= set(points)
    for i in range(n_decoder):
        assert {f"decoder.blocks.{i}", f"decoder.blocks.{i}.attn", f"decoder.blocks.{i}.mlp"} <= set(points)
        # every family in transformers names its attention output projection o_proj
        assert points[f"decoder.blocks.{i}.attn.out"] is points[f"decoder.blocks.{i}.attn"].o_proj
    assert {"projector", "decoder.final_norm", "lm_head", "decoder.embed"} <= set(points)
    assert points["lm_head"] is adapter.lm_head and points["decoder.final_norm"] is adapter.final_norm

    inputs, _ = adapter.build_inputs([image_for(family)], QUESTION)
    seen: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, args, output):
            seen[name] = output[0] if isinstance(output, tuple) else output

        return hook

    names = ("decoder.blocks.0", "vision.blocks.0", "projector", "lm_head")
    handles = [points[name].register_forward_hook(keep(name)) for name in names]
    try:
        with torch.no_grad():
            out = model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    hidden = model.config.get_text_config().hidden_size
    assert set(seen) == set(names)
    assert tuple(seen["decoder.blocks.0"].shape) == (1, inputs["input_ids"].shape[1], hidden)
    assert torch.equal(seen["lm_head"], out.logits)


def test_build_inputs_appends_the_answer(family):
    model, processor, adapter = tiny(family)
    plain, none = adapter.build_inputs([image_for(family)], QUESTION)
    assert none.numel() == 0
    inputs, positions = adapter.build_inputs([image_for(family)], QUESTION, answer=ANSWER)
    answer_ids = processor.tokenizer(ANSWER, add_special_tokens=False)["input_ids"]
    seq = inputs["input_ids"].shape[1]
    assert positions.tolist() == list(range(seq - len(answer_ids), seq))
    assert inputs["input_ids"][0, positions].tolist() == answer_ids
    assert processor.tokenizer.decode(inputs["input_ids"][0, positions]) == ANSWER
    assert torch.equal(inputs["input_ids"][:, : plain["input_ids"].shape[1]], plain["input_ids"])
    for key, value in inputs.items():
        if key.endswith(("_mask", "_ids")) and key != "pixel_attention_mask":
            assert value.shape[-1] == seq, key  # every per-token input grew with the answer
    assert "labels" not in inputs
    # the image layout is unchanged by the appended answer, and the answer is not image
    assert torch.equal(adapter.image_layouts(inputs)[0].all_positions, adapter.image_layouts(plain)[0].all_positions)
    assert set(positions.tolist()) <= set(adapter.text_positions(inputs).tolist())
    assert not set(positions.tolist()) & set(adapter.text_positions(inputs, exclude=positions).tolist())
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[1] == seq


def test_paligemma_answer_is_causal_suffix():
    _model, _processor, adapter = tiny("paligemma")
    inputs, positions = adapter.build_inputs([image_for("paligemma")], QUESTION, answer=ANSWER)
    types = inputs["token_type_ids"][0]
    assert bool((types[positions] == 1).all()) and bool((types[: int(positions[0])] == 0).all())


def test_qwen_answer_tokens_are_text_for_mrope():
    _model, _processor, adapter = tiny("qwen2_vl")
    inputs, positions = adapter.build_inputs([image_for("qwen2_vl")], QUESTION, answer=ANSWER)
    assert bool((inputs["mm_token_type_ids"][0, positions] == 0).all())


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl", "idefics3", "gemma3"])
def test_two_images_get_two_layouts(family):
    model, _processor, adapter = tiny(family)
    images = [image_for(family), tiny_image(VISION_IMAGE_SIZE * 2, VISION_IMAGE_SIZE, seed=1)]
    inputs, _ = adapter.build_inputs(images, QUESTION)
    layouts = adapter.image_layouts(inputs)
    assert [layout.image_index for layout in layouts] == [0, 1]
    assert torch.equal(torch.cat([layout.all_positions for layout in layouts]), image_token_positions(adapter, inputs))
    assert int(layouts[0].all_positions[-1]) < int(layouts[1].all_positions[0])
    with torch.no_grad():
        model(**inputs)


def test_llava_batch_rows_are_laid_out_separately():
    _model, processor, adapter = tiny("llava")
    prompts = [adapter.prompt(1, QUESTION), adapter.prompt(2, "and these two")]
    images = [image_for("llava"), image_for("llava"), tiny_image(40, 40, seed=2)]
    inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True, add_special_tokens=True)
    first, second = adapter.image_layouts(inputs, row=0), adapter.image_layouts(inputs, row=1)
    assert (len(first), len(second)) == (1, 2)
    laid_out = torch.cat([layout.all_positions for layout in second])
    assert torch.equal(laid_out, image_token_positions(adapter, inputs, row=1))


def test_llava_center_crop_region_follows_the_image_size():
    _model, processor, adapter = tiny("llava")
    wide = tiny_image(2 * VISION_IMAGE_SIZE, VISION_IMAGE_SIZE)
    inputs, _ = adapter.build_inputs([wide], QUESTION)
    (layout,) = adapter.image_layouts(inputs)  # build_inputs noted the original size
    assert layout.grids[0].region == pytest.approx((0.0, 0.25, 1.0, 0.75))
    bare = processor(text=adapter.prompt(1, QUESTION), images=[wide], return_tensors="pt")
    assert adapter.image_layouts(bare)[0].grids[0].region is None  # the crop box depends on the size
    (layout,) = adapter.image_layouts(bare, image_sizes=[(wide.height, wide.width)])
    assert layout.grids[0].region == pytest.approx((0.0, 0.25, 1.0, 0.75))
    assert "xmllm_image_sizes" not in inputs  # an attribute, never a model input


def test_patch_grid_gathers_values_row_major():
    grid = PatchGrid("g", 2, 3, torch.tensor([5, 6, 7, 9, 10, 11]))
    values = torch.arange(12.0).expand(2, 12)
    assert grid.gather(values).shape == (2, 2, 3)
    assert grid.gather(values)[0].tolist() == [[5, 6, 7], [9, 10, 11]]
    with pytest.raises(ValueError):
        PatchGrid("bad", 2, 2, torch.tensor([1, 2, 3]))


def test_mismatched_tokens_are_a_one_line_error():
    _model, processor, adapter = tiny("llava")
    inputs, _ = adapter.build_inputs([image_for("llava")], QUESTION)
    first = int(image_token_positions(adapter, inputs)[0])
    inputs["input_ids"][0, first] = processor.tokenizer.pad_token_id
    with pytest.raises(AdapterError) as info:
        adapter.image_layouts(inputs)
    assert "\n" not in str(info.value)


def test_a_family_the_generic_adapter_cannot_serve_is_a_one_line_error():
    """Unknown alone is no refusal (the generic adapter takes it); no image token id is."""

    class Config:
        model_type = "not_a_vlm"

    class Model:
        config = Config()

    with pytest.raises(UnsupportedModelError) as info:
        adapter_for(Model(), None)
    message = str(info.value)
    assert "not_a_vlm" in message and "no image token id" in message and "xmllm models" in message
    assert "\n" not in message
