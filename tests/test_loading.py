"""load_model on a tiny saved LLaVA folder, and its one-line errors."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from tiny_models import build_tiny, tiny_image
from xmllm import XmllmError
from xmllm.explainers.models import (
    LoadedModel,
    ModelLoadError,
    UnsupportedModelError,
    load_model,
    resolve_device,
    resolve_dtype,
    weights_sha256,
)
from xmllm.explainers.models.adapters.llava import LlavaAdapter

QUESTION = "what colour is the square"


@pytest.fixture(scope="module")
def tiny_llava_folder(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A tiny LLaVA and its processor written by save_pretrained, as a user's folder would be."""
    folder = tmp_path_factory.mktemp("tiny-llava")
    model, processor = build_tiny("llava")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, model


def assert_one_line(error: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(error.value)
    assert isinstance(error.value, XmllmError)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_load_folder_gives_model_processor_adapter_and_provenance(tiny_llava_folder):
    folder, original = tiny_llava_folder
    loaded = load_model(folder, device="cpu")
    assert isinstance(loaded, LoadedModel) and isinstance(loaded.adapter, LlavaAdapter)
    assert loaded.source == str(folder.resolve()) and loaded.spec == str(folder)
    assert loaded.device == torch.device("cpu") and loaded.dtype == torch.float32
    assert not loaded.model.training
    expected = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.glob("*.safetensors")))).hexdigest()
    assert loaded.weights_sha256 == expected
    record = loaded.provenance()
    expected_keys = {"spec", "source", "model_type", "revision", "weights_sha256", "device", "dtype", "transformers"}
    assert expected_keys <= set(record)
    assert record["model_type"] == "llava" and record["dtype"] == "float32"

    inputs, answer = loaded.adapter.build_inputs([tiny_image(32, 32)], QUESTION, answer="red")
    with torch.no_grad():
        reloaded = loaded.model(**inputs).logits
        before = original(**inputs).logits
    assert torch.allclose(reloaded, before, atol=1e-5)
    assert answer.numel() >= 1


def test_eager_attention_returns_attention_weights(tiny_llava_folder):
    folder, _ = tiny_llava_folder
    loaded = load_model(folder, device="cpu", dtype="float32", eager_attention=True)
    assert loaded.provenance()["attn_implementation"] == "eager"
    inputs, _ = loaded.adapter.build_inputs([tiny_image(32, 32)], QUESTION)
    with torch.no_grad():
        out = loaded.model(**inputs, output_attentions=True)
    text = loaded.model.config.text_config
    seq = inputs["input_ids"].shape[1]
    assert out.attentions is not None and len(out.attentions) == text.num_hidden_layers
    assert all(tuple(a.shape) == (1, text.num_attention_heads, seq, seq) for a in out.attentions)


def test_explicit_dtype_is_applied(tiny_llava_folder):
    folder, _ = tiny_llava_folder
    loaded = load_model(folder, device="cpu", dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16 and next(loaded.model.parameters()).dtype == torch.bfloat16
    inputs, _ = loaded.adapter.build_inputs([tiny_image(32, 32)], QUESTION)
    assert inputs["pixel_values"].dtype == torch.bfloat16  # build_inputs follows the model


def test_missing_folder_is_one_line(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError) as info:
        load_model(missing, device="cpu")
    assert_one_line(info, str(missing), "does not exist")


def test_folder_without_weights_is_one_line(tmp_path, tiny_llava_folder):
    folder, _ = tiny_llava_folder
    empty = tmp_path / "config-only"
    empty.mkdir()
    (empty / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(ModelLoadError) as info:
        load_model(empty, device="cpu")
    assert_one_line(info, str(empty), "no weights")
    (empty / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ModelLoadError) as info:
        load_model(empty, device="cpu")
    assert_one_line(info, str(empty), "allow_pickle")


def test_folder_without_image_processor_is_one_line(tmp_path, tiny_llava_folder):
    folder, _ = tiny_llava_folder
    copy = tmp_path / "no-image-processor"
    shutil.copytree(folder, copy)
    (copy / "processor_config.json").unlink()  # the tokenizer files alone
    with pytest.raises(ModelLoadError) as info:
        load_model(copy, device="cpu")
    assert_one_line(info, f"cannot load the processor of {copy.resolve()}", "image processor")


def test_folder_without_config_is_one_line(tmp_path):
    with pytest.raises(ModelLoadError) as info:
        load_model(tmp_path, device="cpu")
    assert_one_line(info, str(tmp_path), "config.json")


def test_unsupported_family_fails_before_reading_weights(tmp_path):
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    config.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"never read")
    with pytest.raises(UnsupportedModelError) as info:
        load_model(tmp_path, device="cpu")
    assert_one_line(info, "'llama'", "supported")


def test_uncached_hub_id_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = "xmllm-tests/definitely-not-cached-llava"
    with pytest.raises(ModelLoadError) as info:
        load_model(repo, device="cpu")
    assert_one_line(info, repr(repo), "local Hugging Face cache", f"hf download {repo}", "local folder")


def test_missing_demo_model_is_one_line(monkeypatch, tmp_path):
    import xmllm.explainers.demo

    monkeypatch.setattr(xmllm.explainers.demo, "DEMO_MODEL_DIR", tmp_path / "final")
    with pytest.raises(ModelLoadError) as info:
        load_model("demo", device="cpu")
    assert_one_line(info, "demo", str(tmp_path / "final"), "reinstall")


def test_weights_hash_is_cached_and_follows_changes(tmp_path):
    (tmp_path / "b.safetensors").write_bytes(b"second")
    (tmp_path / "a.safetensors").write_bytes(b"first")
    (tmp_path / "ignored.bin").write_bytes(b"pickle")
    assert weights_sha256(tmp_path) == hashlib.sha256(b"firstsecond").hexdigest()
    assert weights_sha256(tmp_path) == weights_sha256(tmp_path)  # served from the cache
    (tmp_path / "a.safetensors").write_bytes(b"FIRST, changed")
    assert weights_sha256(tmp_path) == hashlib.sha256(b"FIRST, changedsecond").hexdigest()
    assert weights_sha256(tmp_path / "nothing-here") is None


def test_device_and_dtype_resolution():
    auto = resolve_device("auto")
    assert auto.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype(torch.float16, torch.device("cpu")) == torch.float16
    with pytest.raises(ModelLoadError):
        resolve_dtype("float8", torch.device("cpu"))
    with pytest.raises(ModelLoadError):
        resolve_device("not-a-device")
