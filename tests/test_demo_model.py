"""The embedded demo model: committed weights, the hub loading path, accuracy, and training."""
from __future__ import annotations

import json
import os

import pytest
import torch

from xmllm.explainers.demo import DEMO_EARLY_MODEL_DIR, DEMO_MODEL_DIR
from xmllm.explainers.demo.samples import generate_samples
from xmllm.cli import main


@pytest.fixture(scope="module")
def demo():
    from xmllm.explainers import load_model

    return load_model("demo")


def test_weights_are_committed_safetensors_within_budget():
    for folder in (DEMO_MODEL_DIR, DEMO_EARLY_MODEL_DIR):
        weights = list(folder.glob("*.safetensors"))
        assert weights, f"no safetensors in {folder}"
        assert sum(w.stat().st_size for w in weights) <= 25 * 2**20
        assert not list(folder.glob("*.bin"))  # no pickle weights
        for name in ("config.json", "tokenizer.json", "processor_config.json", "chat_template.jinja"):
            assert (folder / name).is_file(), name


def test_loads_through_the_hub_path_as_a_real_llava(demo):
    from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

    assert isinstance(demo.model, LlavaForConditionalGeneration)
    direct = AutoModelForImageTextToText.from_pretrained(DEMO_MODEL_DIR)
    processor = AutoProcessor.from_pretrained(DEMO_MODEL_DIR)
    assert processor.chat_template == demo.processor.chat_template
    s = generate_samples(1, 77)[0]
    inputs, _ = demo.adapter.build_inputs([s.image()], s.text)
    with torch.no_grad():
        assert torch.allclose(direct(**inputs).logits, demo.model(**inputs).logits, atol=1e-5)
    layout = demo.adapter.image_layouts(inputs)[0]
    assert (layout.main_grid.rows, layout.main_grid.cols) == (8, 8)
    assert len(demo.weights_sha256) == 64


def test_answers_fresh_samples_correctly(demo):
    from xmllm.explainers.demo.evaluate import evaluate

    # the bar (>= 95% overall, >= 90% per question type on 1,000 held-out samples of each group) on a
    # slice of a seed never used in training: 100 per question type, single-image and over pictures
    report = evaluate(demo, 500, seed=20261122, progress=False, pictures=400)
    assert report["accuracy"] >= 0.95, report["mistakes"][:5]
    assert set(report["question_types"]) == {"colour", "shape", "count", "presence", "position", "which_picture",
                                             "count_pictures", "motion", "which_frame"}
    assert report["groups"]["single"]["n"] == 500 and report["groups"]["pictures"]["n"] == 400
    for group in ("single", "pictures"):
        assert report["groups"][group]["accuracy"] >= 0.95, (group, report["groups"][group])
    for qtype, r in report["question_types"].items():
        assert r["accuracy"] >= 0.9, (qtype, r)


def test_ask_answers_an_image_and_a_sample_set(tmp_path, capsys):
    s = generate_samples(3, 31)[0]
    s.image().save(tmp_path / "shapes.png")
    assert main(["ask", "--image", str(tmp_path / "shapes.png"), "--question", s.text, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["answer"] == s.answer and 0 < out["probs"][0] <= 1
    assert main(["demo", "samples", "--n", "5", "--seed", "31", "--out", str(tmp_path / "set")]) == 0
    capsys.readouterr()
    assert main(["ask", "--samples", str(tmp_path / "set" / "samples.jsonl"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 5 and sum(r["correct"] for r in rows) >= 4
    assert rows[0]["answer"] == s.answer


def test_ask_errors_are_one_line(tmp_path, capsys):
    assert main(["ask", "--image", str(tmp_path / "missing.png"), "--question", "What colour is the circle?"]) == 2
    err = capsys.readouterr().err.strip()
    assert "missing.png: image not found" in err and "\n" not in err
    assert main(["ask", "--question", "Hi?"]) == 2
    assert "give --image (repeatable) or --video" in capsys.readouterr().err
    assert main(["ask", "--image", str(tmp_path / "missing.png"), "--question", " "]) == 2
    assert "--question: a non-empty question is required" in capsys.readouterr().err


def test_demo_eval_json(capsys):
    assert main(["demo", "eval", "--n", "10", "--pictures", "4", "--seed", "5", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 14 and 0 <= report["accuracy"] <= 1 and report["question_types"]
    assert {g: r["n"] for g, r in report["groups"].items()} == {"single": 10, "pictures": 4}
    assert main(["demo", "eval", "--n", "10", "--pictures", "-1"]) == 2
    assert "--pictures must be 0 or more" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("XMLLM_LONG_CHECKS") != "1",
                    reason="a long check: .ci/run runs it as its own step (XMLLM_LONG_CHECKS=1)")
def test_training_is_reproducible(tmp_path):
    from xmllm.explainers.demo.train import TrainConfig, train

    cfg = TrainConfig(vision_steps=2, qa_steps=2, restart_steps=2, batch=4, qa_samples=16, warmup=1, early_step=1,
                      threads=1, monitor_every=2, picture_cycles=((2, 1e-3),), picture_samples=16,
                      picture_single_samples=16)
    train(tmp_path / "a", cfg, log=lambda _: None)
    train(tmp_path / "b", cfg, log=lambda _: None)
    a = (tmp_path / "a" / "final" / "model.safetensors").read_bytes()
    b = (tmp_path / "b" / "final" / "model.safetensors").read_bytes()
    assert a == b
    assert (tmp_path / "a" / "early" / "xmllm_training.json").is_file()
    # stage 3 grew the vocabulary by the picture questions' words; the single-image stages did not
    final = json.loads((tmp_path / "a" / "final" / "tokenizer.json").read_text())["model"]["vocab"]
    single = json.loads((tmp_path / "a" / "single" / "tokenizer.json").read_text())["model"]["vocab"]
    assert {"first", "frame", "up"} <= set(final) - set(single) and all(final[w] == i for w, i in single.items())
    early = json.loads((tmp_path / "a" / "early" / "tokenizer.json").read_text())["model"]["vocab"]
    assert early == final  # grown too: training.compare sets it beside the final model
    meta = json.loads((tmp_path / "a" / "final" / "xmllm_training.json").read_text())
    assert "motion" in meta["question_types"] and meta["history"]["pictures"]


def test_a_resumed_restart_cycle_equals_an_uninterrupted_run(tmp_path):
    """The first answer cycle is saved; a rerun that finds it (and the vision stage) goes on
    from there and ends with the same bytes as a run that never stopped."""
    import shutil

    from xmllm.explainers.demo.train import TrainConfig, train

    cfg = TrainConfig(vision_steps=2, qa_steps=2, restart_steps=2, batch=4, qa_samples=16, warmup=1, early_step=1,
                      threads=1, monitor_every=0, picture_cycles=(), picture_samples=16, picture_single_samples=16)
    train(tmp_path / "a", cfg, log=lambda _: None)
    whole = (tmp_path / "a" / "final" / "model.safetensors").read_bytes()
    assert whole != (tmp_path / "a" / "cycle-1" / "model.safetensors").read_bytes()  # the restart trained
    shutil.rmtree(tmp_path / "a" / "final")
    lines: list[str] = []
    train(tmp_path / "a", cfg, log=lines.append)
    assert any("resumed" in line and "cycle-1" in line for line in lines)
    assert (tmp_path / "a" / "final" / "model.safetensors").read_bytes() == whole
    # a different first cycle is not reused
    other = TrainConfig(**{**cfg.__dict__, "qa_lr": cfg.qa_lr / 2})
    lines.clear()
    train(tmp_path / "a", other, log=lines.append)
    assert not any("cycle-1" in line for line in lines)


def test_the_picture_stage_resumes_from_the_single_image_model(tmp_path):
    """Stage 3 starts from the saved single-image model (as the committed weights were made: from the
    committed single-image model) and ends with the same bytes as a run that never stopped."""
    import shutil

    from xmllm.explainers.demo.train import TrainConfig, train

    cfg = TrainConfig(vision_steps=2, qa_steps=2, restart_steps=0, batch=4, qa_samples=16, warmup=1, early_step=1,
                      threads=1, monitor_every=0, picture_cycles=((2, 1e-3), (2, 5e-4)), picture_samples=16,
                      picture_single_samples=16)
    train(tmp_path / "a", cfg, log=lambda _: None)
    whole = (tmp_path / "a" / "final" / "model.safetensors").read_bytes()
    for name in ("final", "pictures-1", "pictures-2", "vision.pt"):
        path = tmp_path / "a" / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    lines: list[str] = []
    train(tmp_path / "a", cfg, log=lines.append)
    assert any("single-image stages resumed" in line for line in lines)
    assert not any(line.startswith(("vision", "answer")) for line in lines)
    assert (tmp_path / "a" / "final" / "model.safetensors").read_bytes() == whole
    shutil.rmtree(tmp_path / "a" / "final")  # the second picture cycle alone reruns
    lines.clear()
    train(tmp_path / "a", cfg, log=lines.append)
    assert any("picture cycle 2 resumed" in line for line in lines)
    assert (tmp_path / "a" / "final" / "model.safetensors").read_bytes() == whole
