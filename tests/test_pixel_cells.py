"""Pixel-to-grid maps on tiny models of every family and on the demo model.

The maps are checked against what the model computes, not against our own arithmetic: with
the vision tower's attention switched off, every remaining step (patch embedding, MLPs, norms,
merging, pooling, projection) is local, so perturbing the pixels the map assigns to one cell
must change that cell's image feature and no other.
"""
from __future__ import annotations

import contextlib
import copy
from collections import Counter
from pathlib import Path

import pytest
import torch


from tiny_models import FAMILIES, TEST_IMAGE_SIZES, build_tiny, missing_dependency, tiny_image

from xmllm.explainers.models import adapter_for

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

QUESTION = "what colour is the square"
FEATURE_KWARGS: dict[str, tuple[str, ...]] = {
    "llava_next": ("image_sizes",),
    "qwen2_vl": ("image_grid_thw",),
    "qwen2_5_vl": ("image_grid_thw",),
    "idefics3": ("pixel_attention_mask",),
    "smolvlm": ("pixel_attention_mask",),
}
PERTURBATION = 3.0
"""Added to the normalised pixel values of one cell: large against their unit scale."""
LOCAL = 1e-5
"""Relative change below which a feature counts as untouched (float round-off)."""
DEMO_WEIGHTS = (Path(__file__).resolve().parents[1] / "explainers/demo/weights/final", Path("/tmp/demo-early-run1"))

_CACHE: dict[str, tuple] = {}


def randomise_zero_matrices(model: torch.nn.Module, std: float = 0.02) -> None:
    """Give weight matrices left at zero by their init (Gemma 3's projection) random values.

    A zero matrix makes every image feature zero, and then nothing can be said about pixels.
    """
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2 and not bool(param.any()):
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def tiny(family: str):
    package = missing_dependency(family)
    if package:
        pytest.skip(f"the {family} processor needs {package}, which is not installed")
    if family not in _CACHE:
        model, processor = build_tiny(family)
        randomise_zero_matrices(model)
        adapter = adapter_for(model, processor)
        inputs, _ = adapter.build_inputs([tiny_image(*TEST_IMAGE_SIZES[family])], QUESTION)
        _CACHE[family] = (model, adapter, inputs)
    return _CACHE[family]


@pytest.fixture(scope="module")
def demo():
    from xmllm.explainers.models import load_model

    for path in DEMO_WEIGHTS:
        if (path / "config.json").is_file():
            return load_model(str(path), eager_attention=True)
    pytest.skip("no demo-model weights")


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@contextlib.contextmanager
def attention_off(adapter):
    """Zero every vision block's attention output: the tower becomes token-local."""

    def zero(module, args, output):
        if isinstance(output, tuple):
            return (torch.zeros_like(output[0]), *output[1:])
        return torch.zeros_like(output)

    points = adapter.hook_points()
    names = [n for n in points if n.startswith("vision.blocks.") and n.endswith(".attn")]
    handles = [points[n].register_forward_hook(zero) for n in names]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def image_features(model, family: str, inputs, pixel_values) -> torch.Tensor:
    """(image tokens, hidden): get_image_features in the order the tokens sit in the sequence."""
    kwargs = {k: inputs[k] for k in FEATURE_KWARGS.get(family, ())}
    with torch.no_grad():
        pooled = model.get_image_features(pixel_values=pixel_values, **kwargs).pooler_output
    if torch.is_tensor(pooled):
        return pooled.reshape(-1, pooled.shape[-1])
    return torch.cat([p.reshape(-1, p.shape[-1]) for p in pooled])


def perturbed(pixels: torch.Tensor, cells: torch.Tensor, position: int) -> torch.Tensor:
    return torch.where(cells == position, pixels + PERTURBATION, pixels)


def probe_cells(layout) -> list[tuple[str, int]]:
    """One cell near the middle of every grid, plus a corner of the main grid."""
    out = [(g.name, int(g.positions[g.size // 2 + g.cols // 2])) for g in layout.grids]
    return out + [(layout.main_grid.name, int(layout.main_grid.positions[-1]))]


def test_map_covers_exactly_the_grid_cells(family):
    _model, adapter, inputs = tiny(family)
    cells = adapter.pixel_cell_map(inputs)
    pixels = inputs["pixel_values"]
    assert cells.shape == pixels.shape and cells.dtype == torch.long and cells.device == pixels.device
    layouts = adapter.image_layouts(inputs)
    grid_positions = {int(p) for layout in layouts for g in layout.grids for p in g.positions}
    mapped = set(torch.unique(cells).tolist()) - {-1}
    assert mapped == grid_positions  # every cell is covered, nothing else is
    extras = {int(p) for layout in layouts for v in layout.extra_positions.values() for p in v}
    assert not mapped & extras  # newline / class tokens carry no pixels


def test_cells_of_a_grid_cover_equal_areas(family):
    _model, adapter, inputs = tiny(family)
    counts = Counter(adapter.pixel_cell_map(inputs).flatten().tolist())
    for layout in adapter.image_layouts(inputs):
        for grid in layout.grids:
            areas = {counts[int(p)] for p in grid.positions}
            assert len(areas) == 1 and min(areas) > 0, (grid.name, sorted(areas))


def test_perturbing_a_cell_changes_only_its_feature(family):
    model, adapter, inputs = tiny(family)
    cells = adapter.pixel_cell_map(inputs)
    image_positions = torch.nonzero(inputs["input_ids"][0] == adapter.image_token_id).flatten()
    layout = adapter.image_layouts(inputs)[0]
    with attention_off(adapter):
        clean = image_features(model, family, inputs, inputs["pixel_values"])
        assert clean.shape[0] == image_positions.numel()
        for grid_name, position in probe_cells(layout):
            moved = image_features(model, family, inputs, perturbed(inputs["pixel_values"], cells, position))
            change = (moved - clean).norm(dim=-1)
            target = image_positions == position
            assert float(change[target]) > 0.0, grid_name
            assert float(change[~target].max()) <= LOCAL * float(change[target]), grid_name


def test_vision_token_map_matches_the_blocks(family):
    model, adapter, inputs = tiny(family)
    cells = adapter.pixel_cell_map(inputs)
    tokens = adapter.vision_token_map(inputs)
    block = adapter.hook_points()["vision.blocks.0"]
    seen: list[torch.Tensor] = []
    handle = block.register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    layout = adapter.image_layouts(inputs)[0]
    try:
        with attention_off(adapter):
            image_features(model, family, inputs, inputs["pixel_values"])
            for _name, position in probe_cells(layout):
                image_features(model, family, inputs, perturbed(inputs["pixel_values"], cells, position))
    finally:
        handle.remove()
    clean = seen[0]
    assert tuple(tokens.shape) == tuple(clean.shape[:-1])
    for (_name, position), moved in zip(probe_cells(layout), seen[1:], strict=True):
        changed = (moved - clean).norm(dim=-1) > LOCAL * (moved - clean).norm(dim=-1).max()
        assert torch.equal(changed, tokens == position)


def test_llava_class_token_and_margins_map_to_no_cell():
    _model, adapter, inputs = tiny("llava")
    tokens = adapter.vision_token_map(inputs)
    assert adapter.vision_extra_tokens() == 1 and bool((tokens[:, 0] == -1).all())
    assert bool((tokens[:, 1:] >= 0).all())


def test_llava_next_unpadded_cells_map_to_no_cell():
    model, adapter, inputs = tiny("llava_next")
    cells = adapter.pixel_cell_map(inputs)[0, :, 0]  # (crops, H, W)
    tiles = adapter.image_layouts(inputs)[0].grid("tiles")
    vision = model.config.vision_config
    side = vision.image_size // vision.patch_size
    removed_cells = (cells.shape[0] - 1) * side * side - tiles.size
    assert removed_cells > 0  # the test image is letterboxed in its canvas
    assert int((cells[1:] == -1).sum()) == removed_cells * vision.patch_size**2
    assert bool((cells[0] >= 0).all())  # the base view is never unpadded


def test_demo_patch_embeddings_move_only_in_the_perturbed_cell(demo):
    from xmllm.explainers.demo.samples import generate_sample

    sample = generate_sample(0, 0)
    adapter = demo.adapter
    inputs, _ = adapter.build_inputs([sample.image()], sample.text)
    cells = adapter.pixel_cell_map(inputs)
    tokens = adapter.vision_token_map(inputs)
    grid = adapter.image_layouts(inputs)[0].main_grid
    tower = adapter.vision_tower
    embeddings = tower.vision_model.embeddings if hasattr(tower, "vision_model") else tower.embeddings
    with torch.no_grad():
        clean = embeddings(inputs["pixel_values"])
    assert tuple(clean.shape[:-1]) == tuple(tokens.shape)
    for position in (int(grid.positions[0]), int(grid.positions[grid.size // 2 + grid.cols // 2])):
        with torch.no_grad():
            moved = embeddings(perturbed(inputs["pixel_values"], cells, position))
        change = (moved - clean).norm(dim=-1)
        # before any attention mixing, the perturbed cell's patch tokens move, and only they
        assert torch.equal(change > 0, tokens == position)
        assert int((tokens == position).sum()) == 1  # one CLIP patch per grid cell


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_5_vl", "idefics3", "gemma3"])
def test_two_images_map_to_their_own_layouts(family):
    model, adapter, _ = tiny(family)
    images = [tiny_image(*TEST_IMAGE_SIZES[family]), tiny_image(64, 32, seed=1)]
    inputs, _ = adapter.build_inputs(images, QUESTION)
    cells = adapter.pixel_cell_map(inputs)
    layouts = adapter.image_layouts(inputs)
    assert len(layouts) == 2
    mapped = set(torch.unique(cells).tolist()) - {-1}
    assert mapped == {int(p) for layout in layouts for g in layout.grids for p in g.positions}
    image_positions = torch.nonzero(inputs["input_ids"][0] == adapter.image_token_id).flatten()
    with attention_off(adapter):
        clean = image_features(model, family, inputs, inputs["pixel_values"])
        position = int(layouts[1].main_grid.positions[0])
        moved = image_features(model, family, inputs, perturbed(inputs["pixel_values"], cells, position))
    change = (moved - clean).norm(dim=-1)
    assert int(image_positions[change.argmax()]) == position
    assert float(change.topk(2).values[1]) <= LOCAL * float(change.max())


GEMMA3_POOLINGS = [(2, 32, 1, 8), (9, 32, 4, 2), (4, 36, 2, 4)]
"""(mm_tokens_per_image, vision input pixels, pooled side, kernel in patches of 4 pixels), as
Gemma3MultiModalProjector pools: 2 -> one token; 9 on 8 x 8 patches -> a kernel of 2, so 4 x 4
tokens; 4 on 9 x 9 patches -> 2 x 2 tokens of 4 x 4 patches, the last row and column of patches
pooled into none."""


def gemma3_pooled(mm_tokens: int, image_size: int, side: int):
    """The tiny Gemma 3 with ``mm_tokens_per_image=mm_tokens`` on ``image_size``-pixel vision
    inputs, its processor writing the ``side * side`` image tokens the projector makes."""
    from transformers import Gemma3ForConditionalGeneration

    base, processor = build_tiny("gemma3")
    config = copy.deepcopy(base.config)
    config.mm_tokens_per_image = mm_tokens
    config.vision_config.image_size = image_size
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config).eval()
    randomise_zero_matrices(model)
    image_processor = type(processor.image_processor)(size={"height": image_size, "width": image_size})
    processor = type(processor)(image_processor=image_processor, tokenizer=processor.tokenizer,
                                chat_template=processor.chat_template, image_seq_length=side * side)
    adapter = adapter_for(model, processor)
    inputs, _ = adapter.build_inputs([tiny_image(*TEST_IMAGE_SIZES["gemma3"])], QUESTION)
    return model, adapter, inputs


@pytest.mark.parametrize(("mm_tokens", "image_size", "side", "kernel"), GEMMA3_POOLINGS)
def test_gemma3_grid_is_the_projectors_pooling(mm_tokens, image_size, side, kernel):
    model, adapter, inputs = gemma3_pooled(mm_tokens, image_size, side)
    (grid,) = adapter.image_layouts(inputs)[0].grids
    assert (grid.rows, grid.cols) == (side, side) and adapter.pooling_kernel() == kernel
    with torch.no_grad():
        model(**inputs)  # transformers runs it: as many image tokens as pooled features
    cells = adapter.pixel_cell_map(inputs)
    assert set(torch.unique(cells).tolist()) - {-1} == {int(p) for p in grid.positions}
    counts = Counter(cells.flatten().tolist())
    channels = inputs["pixel_values"].shape[1]
    cell_pixels = kernel * adapter.patch_size
    assert {counts[int(p)] for p in grid.positions} == {channels * cell_pixels**2}
    assert counts.get(-1, 0) == channels * (image_size**2 - (side * cell_pixels) ** 2)  # unpooled patches
    if side == 1:
        return
    image_positions = torch.nonzero(inputs["input_ids"][0] == adapter.image_token_id).flatten()
    with attention_off(adapter):
        clean = image_features(model, "gemma3", inputs, inputs["pixel_values"])
        for position in (int(grid.positions[0]), int(grid.positions[-1])):
            moved = image_features(model, "gemma3", inputs, perturbed(inputs["pixel_values"], cells, position))
            change = (moved - clean).norm(dim=-1)
            target = image_positions == position
            assert float(change[target]) > 0.0
            assert float(change[~target].max()) <= LOCAL * float(change[target])
