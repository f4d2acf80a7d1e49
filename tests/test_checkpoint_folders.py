"""Tiny models saved with save_pretrained and loaded back the way a user does: ``xmllm.load_model(FOLDER)``
and ``xmllm explain --model FOLDER`` (issue #24, item 7).

- A processor with a video part (Qwen2-VL, Qwen2.5-VL, SmolVLM) loads without torchvision: its
  image processor (PIL backend) and tokenizer, the video part left out, said once.
- A folder whose processor has no image processor is one line (exit 2), not an AttributeError.
- An empty answer is one line (exit 2) that suggests ``--answer``.
- Gemma 3 with ``mm_tokens_per_image=2`` is laid out as the one token its projector writes.
"""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import xmllm
from tiny_models import TEST_IMAGE_SIZES, build_tiny, tiny_image
from xmllm.cli import main
from xmllm.explainers.models import ModelLoadError, loading
from xmllm.explainers.models.loading import NoVideoProcessor

QUESTION = "what colour is the square"
VIDEO_PROCESSORS = {"qwen2_vl": "Qwen2VLVideoProcessor", "qwen2_5_vl": "Qwen2VLVideoProcessor",
                    "smolvlm": "SmolVLMVideoProcessor"}
"""Families of the tiny models whose processor has a video part, and the video processor class
their released checkpoints name (transformers' own mapping names it only where torchvision loads)."""
VIDEO_FAMILIES = tuple(VIDEO_PROCESSORS)
EXPLAINER = "attention.rollout"


def torchvision_problem() -> str | None:
    """Why torchvision does not load here (None when it does)."""
    try:
        import torchvision  # noqa: F401
    except Exception as error:  # noqa: BLE001 - a missing package, or a build whose operators do not register
        return f"{type(error).__name__}: {error}".splitlines()[0]
    return None


NO_TORCHVISION = torchvision_problem()


def _edit_json(path: Path, **changes) -> None:
    content = json.loads(path.read_text())
    content.update(changes)
    path.write_text(json.dumps(content, indent=2))


_FOLDERS: dict[str, Path] = {}


def saved(family: str, root: Path, *, as_released: bool = True) -> Path:
    """The tiny ``family`` model and processor written by save_pretrained into a folder.

    The tiny builders give video families a subclass of the family's processor (transformers
    cannot build them without torchvision), whose name the folder records. ``as_released`` names
    the family's own processor and video processor classes instead, as a released checkpoint does.
    """
    key = f"{family}-{'released' if as_released else 'as-built'}"
    if key not in _FOLDERS:
        from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

        folder = root / key
        model, processor = build_tiny(family)
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        config = folder / "processor_config.json"
        if as_released and family in VIDEO_FAMILIES:
            content = json.loads(config.read_text())
            content["processor_class"] = PROCESSOR_MAPPING_NAMES[family]
            content["video_processor"]["video_processor_type"] = VIDEO_PROCESSORS[family]
            config.write_text(json.dumps(content, indent=2))
        _FOLDERS[key] = folder
    return _FOLDERS[key]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "image.png"
    tiny_image(64, 40).save(path)
    return path


@pytest.fixture
def fresh_notice(monkeypatch):
    """The 'said once' notices start unsaid."""
    monkeypatch.setattr(loading, "_warned_video", set())


def explain(folder: Path, image: Path, out: Path, *extra: str) -> int:
    return main(["explain", "--model", str(folder), "--image", str(image), "--question", QUESTION,
                 "--explainers", EXPLAINER, "--device", "cpu", "--out", str(out), *extra])


def one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines()
             if line.strip() and not line.startswith("explaining:")]
    assert len(lines) == 1, lines
    assert lines[0].startswith("xmllm: error: ")
    return lines[0]


# --- video families without torchvision -------------------------------------------------------------


@pytest.mark.skipif(NO_TORCHVISION is None, reason="torchvision loads here: the processor keeps its video part")
@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_video_family_loads_and_explains_without_torchvision(family, root, image, tmp_path, caplog, fresh_notice):
    folder = saved(family, root)
    _model, built = build_tiny(family)
    with caplog.at_level(logging.WARNING, logger=loading.__name__):
        loaded = xmllm.load_model(folder, device="cpu")
        xmllm.load_model(folder, device="cpu")
    notices = [r.getMessage() for r in caplog.records if "torchvision" in r.getMessage()]
    assert len(notices) == 1 and "\n" not in notices[0], notices  # said once, on one line
    assert notices[0].startswith("xmllm: warning: ") and "pip install torchvision" in notices[0]
    processor = loaded.processor
    assert type(processor).__name__ == type(built).__mro__[1].__name__  # the family's own class
    assert type(processor.image_processor).__name__.endswith("Pil")
    assert isinstance(processor.video_processor, NoVideoProcessor)
    assert json.loads(processor.to_json_string())["processor_class"] == type(processor).__name__
    with pytest.raises(ModelLoadError, match="no video part.*pip install torchvision"):
        processor.video_processor([])

    # the same inputs as the processor the folder was saved from
    picture = tiny_image(*TEST_IMAGE_SIZES[family])
    ours, _ = loaded.adapter.build_inputs([picture], QUESTION)
    theirs, _ = type(loaded.adapter)(loaded.model, built).build_inputs([picture], QUESTION)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key

    out = tmp_path / "run"
    assert explain(folder, image, out) == 0
    assert (out / "report.html").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert EXPLAINER in json.dumps(manifest)


@pytest.mark.skipif(NO_TORCHVISION is None, reason="torchvision loads here: the processor keeps its video part")
def test_video_notice_is_one_line_of_ours_on_the_command_line(root, image, tmp_path):
    folder = saved("qwen2_vl", root)
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "xmllm.cli", "explain", "--model", str(folder), "--image", str(image),
         "--question", QUESTION, "--explainers", EXPLAINER, "--device", "cpu", "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.replace("\r", "\n").splitlines()
    notices = [line for line in lines if "torchvision" in line]
    assert len(notices) == 1, notices
    assert "xmllm: warning: Qwen2VLProcessor without its video part" in notices[0]
    assert (out / "report.html").is_file()


def test_split_processor_files_load_without_torchvision(root, tmp_path, fresh_notice):
    """A released Qwen2-VL keeps its settings in preprocessor_config.json,
    video_preprocessor_config.json and chat_template.jinja, with no processor_config.json."""
    folder = tmp_path / "split"
    shutil.copytree(saved("qwen2_vl", root), folder)
    nested = json.loads((folder / "processor_config.json").read_text())
    (folder / "processor_config.json").unlink()
    image_settings = {**nested["image_processor"], "processor_class": nested["processor_class"]}
    (folder / "preprocessor_config.json").write_text(json.dumps(image_settings))
    (folder / "video_preprocessor_config.json").write_text(json.dumps(nested["video_processor"]))
    loaded = xmllm.load_model(folder, device="cpu")
    assert type(loaded.processor).__name__ == "Qwen2VLProcessor"
    if NO_TORCHVISION is not None:
        video = loaded.processor.video_processor
        assert isinstance(video, NoVideoProcessor) and video["video_processor_type"] == "Qwen2VLVideoProcessor"
    inputs, _ = loaded.adapter.build_inputs([tiny_image(*TEST_IMAGE_SIZES["qwen2_vl"])], QUESTION)
    assert loaded.adapter.image_layouts(inputs)[0].main_grid.size > 0


@pytest.mark.skipif(NO_TORCHVISION is not None, reason=f"torchvision does not load here: {NO_TORCHVISION}")
@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_video_family_keeps_its_video_part_with_torchvision(family, root, image, tmp_path, caplog, fresh_notice):
    folder = saved(family, root)
    with caplog.at_level(logging.WARNING, logger=loading.__name__):
        loaded = xmllm.load_model(folder, device="cpu")
    assert not [r for r in caplog.records if "torchvision" in r.getMessage()]
    assert not isinstance(loaded.processor.video_processor, NoVideoProcessor)
    assert explain(folder, image, tmp_path / "run") == 0


# --- a processor with no image processor -------------------------------------------------------------


def test_processor_class_that_does_not_exist_is_one_line(root, image, tmp_path, capsys):
    """The tiny Qwen2-VL as built names its own subclass, which AutoProcessor cannot find: it
    quietly gives the bare tokenizer, which used to fail later with an AttributeError."""
    folder = saved("qwen2_vl", root, as_released=False)
    named = json.loads((folder / "processor_config.json").read_text())["processor_class"]
    assert named == "Qwen2VLProcessorImageOnly"
    with pytest.raises(ModelLoadError) as info:
        xmllm.load_model(folder, device="cpu")
    message = str(info.value)
    assert "\n" not in message
    for fragment in (f"cannot load the processor of {folder.resolve()}", "has no image processor", repr(named),
                     "set processor_class to 'Qwen2VLProcessor'"):
        assert fragment in message, message
    assert explain(folder, image, tmp_path / "run") == 2
    assert "has no image processor" in one_error_line(capsys)


# --- an empty answer -------------------------------------------------------------------------------


def test_empty_answer_is_one_line_that_suggests_answer(root, tmp_path, capsys):
    """A PaliGemma whose first generated token ends the answer (its generation config suppresses
    every other token): nothing to explain unless an answer is given."""
    folder = tmp_path / "paligemma-silent"
    shutil.copytree(saved("paligemma", root), folder)
    generation = json.loads((folder / "generation_config.json").read_text())
    vocab = json.loads((folder / "config.json").read_text())["text_config"]["vocab_size"]
    eos = generation["eos_token_id"]
    _edit_json(folder / "generation_config.json", suppress_tokens=[i for i in range(vocab) if i != eos])
    image = tmp_path / "image.png"
    tiny_image(*TEST_IMAGE_SIZES["paligemma"]).save(image)
    assert explain(folder, image, tmp_path / "run") == 2
    line = one_error_line(capsys)
    assert "the model gave an empty answer; nothing to explain" in line and "--answer TEXT" in line
    assert explain(folder, image, tmp_path / "given", "--answer", "red") == 0


# --- Gemma 3 pooled to a count that is not a square -------------------------------------------------


def test_gemma3_two_tokens_per_image_is_the_one_pooled_token(root, tmp_path):
    """mm_tokens_per_image=2: the projector pools the 8 x 8 patches with a kernel of
    8 // int(sqrt(2)) = 8, one token per image, which the processor must then write."""
    folder = tmp_path / "gemma3-two"
    shutil.copytree(saved("gemma3", root), folder)
    _edit_json(folder / "config.json", mm_tokens_per_image=2)
    _edit_json(folder / "processor_config.json", image_seq_length=1)
    loaded = xmllm.load_model(folder, device="cpu")
    inputs, _ = loaded.adapter.build_inputs([tiny_image(*TEST_IMAGE_SIZES["gemma3"])], QUESTION)
    (grid,) = loaded.adapter.image_layouts(inputs)[0].grids
    assert (grid.rows, grid.cols) == (1, 1)
    cells = loaded.adapter.pixel_cell_map(inputs)
    assert set(torch.unique(cells).tolist()) == {int(grid.positions[0])}  # the one token covers every pixel
    image = tmp_path / "image.png"
    tiny_image(*TEST_IMAGE_SIZES["gemma3"]).save(image)
    out = tmp_path / "run"
    assert main(["explain", "--model", str(folder), "--image", str(image), "--question", QUESTION,
                 "--explainers", "gradient.saliency", "--device", "cpu", "--out", str(out)]) == 0
    assert (out / "report.html").is_file()


@pytest.mark.parametrize("family", ["minicpmv4_6", "minicpmv4_7"])
def test_packed_patch_family_loads_from_its_folder_and_explains(family, root, tmp_path):
    """MiniCPM-V (NaViT-packed patches, the image token id left to the checkpoint) saved as released:
    the family's own processor class named, loaded through the user's path; a pixel explainer's map
    covers the image and occlusion's batched copies reach the model packed."""
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    folder = root / f"{family}-released"
    if not folder.exists():
        model, processor = build_tiny(family)
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        _edit_json(folder / "processor_config.json", processor_class=PROCESSOR_MAPPING_NAMES[family])
    loaded = xmllm.load_model(str(folder), device="cpu")
    assert type(loaded.processor).__name__ == PROCESSOR_MAPPING_NAMES[family] and loaded.adapter.kind == "generic"
    run = xmllm.explain(loaded, tiny_image(64, 40), QUESTION, ["gradient.saliency", "perturbation.occlusion"],
                        answer="red", faithfulness=False)
    maps = {e.explainer: e.maps["image"] for e in run.explanations}
    assert set(maps) == {"gradient.saliency", "perturbation.occlusion"}
    for name, values in maps.items():
        values = torch.as_tensor(values)
        assert values.shape[-2:] == (2, 4) and bool(torch.isfinite(values).all()), name  # a 32 x 64 view: 2 x 4 tokens
        assert float(values.abs().sum()) > 0, name
