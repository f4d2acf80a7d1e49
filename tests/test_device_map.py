"""Shard and offload (``device_map``): a model loaded through accelerate's dispatch, with most of its
blocks kept on disk and run one at a time, gives every explainer the same results as the plain
load; the CLI, the API and the audit config take the options, and bad values are one line."""
from __future__ import annotations

import importlib.util
import json
import math
import sys

import numpy as np
import pytest
import xmllm
from xmllm import XmllmError
from xmllm.cli import main
from xmllm.explainers.demo.samples import generate_samples
from xmllm.explainers.models import load_model
from xmllm.explainers.models.dispatch import (
    DeviceMapError,
    execution_device,
    make_dispatch,
    parse_device_memory,
)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("accelerate") is None,
                                reason="accelerate is not installed (pip install xmllm[offload])")

REPRESENTATIVE = ["attention.raw", "relevancy.chefer", "gradient.saliency", "lens.logit", "perturbation.occlusion",
                  "intervention.activation_patching", "neurons.top_activations"]
DEMO_CPU_LIMIT = "4MB"
"""Of the demo model's 5.6 MB of weights: the vision tower, projector, embeddings and the first
decoder layer stay in CPU memory, the other decoder layers, the final norm and the head go to disk."""


@pytest.fixture(scope="module")
def sample():
    return generate_samples(1, seed=0, question_types=["colour"])[0]


@pytest.fixture(scope="module")
def plain():
    return load_model("demo", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def offloaded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("offload")
    loaded = load_model("demo", dtype="float32", device_map="auto", device_memory={"cpu": DEMO_CPU_LIMIT},
                        offload_folder=folder)
    return loaded, folder


def _arrays(run) -> dict[str, np.ndarray]:
    out = {}
    for eid in run.ids:
        explanation = run[eid]
        for name, values in explanation.maps.items():
            out[f"{eid} {name}"] = np.asarray(values)
        for name, value in explanation.scores.items():
            out[f"{eid} score {name}"] = np.asarray(value, dtype=np.float64)
    return out


def _assert_same(expected, got) -> None:
    assert got.ids == expected.ids and got.ids  # ran, not skipped
    assert got.answer["text"] == expected.answer["text"]
    np.testing.assert_allclose(got.answer["probs"], expected.answer["probs"], rtol=1e-5)
    a, b = _arrays(expected), _arrays(got)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].shape == b[key].shape, key
        assert np.allclose(b[key], a[key], rtol=1e-5, atol=1e-7, equal_nan=True), key


# --- the device map -----------------------------------------------------------------------------------


def test_most_blocks_go_to_disk_and_the_provenance_records_the_map(offloaded) -> None:
    loaded, folder = offloaded
    record = loaded.provenance()["device_map"]
    blocks = record["map"]
    assert record["strategy"] == "auto" and record["max_memory"] == {"cpu": 4_000_000}
    assert record["offload_folder"] == str(folder)
    on_disk = [name for name, device in blocks.items() if device == "disk"]
    assert len(on_disk) > len(blocks) / 2  # most blocks: decoder layers one by one, the norm and the head
    assert sum(name.startswith("model.language_model.layers.") for name in on_disk) >= 2
    assert record["blocks"]["disk"] == len(on_disk)
    modules = dict(loaded.model.named_modules())
    for name in on_disk:  # not in memory: read from disk (the safetensors files, or the offload folder) as they run
        assert {p.device.type for p in modules[name].parameters()} <= {"meta"}, name
    assert loaded.device.type == "cpu" and loaded.adapter.device.type == "cpu"
    json.dumps(loaded.provenance())  # the manifest can hold it


@pytest.mark.parametrize("eid", REPRESENTATIVE)
def test_explainers_on_the_offloaded_demo_equal_the_plain_load(plain, offloaded, sample, eid) -> None:
    expected = xmllm.explain(plain, sample.image(), sample.text, [eid], faithfulness=False)
    got = xmllm.explain(offloaded[0], sample.image(), sample.text, [eid], faithfulness=False)
    _assert_same(expected, got)
    assert got.manifest["model"]["device_map"]["blocks"]["disk"] >= 2  # the manifest says how it ran


@pytest.mark.parametrize("eid", ["gradient.saliency", "relevancy.chefer", "neurons.top_activations"])
def test_recomputed_backwards_on_the_offloaded_demo_keep_no_weights(plain, offloaded, sample, eid) -> None:
    """Without recompute the backward keeps every offloaded block's weights (autograd saved them when
    the block ran), which on a GPU undoes the offload; recomputing each block in the backward keeps
    none past its own block, and the results stay equal to the plain load's."""
    import torch

    shapes = {tuple(p.shape) for p in plain.model.parameters() if p.dim() == 2}
    shapes |= {shape[::-1] for shape in shapes}
    weights = sum(p.numel() * p.element_size() for p in plain.model.parameters())
    held: dict[int, int] = {}

    def pack(tensor):
        if tensor.dim() == 2 and tuple(tensor.shape) in shapes:
            held[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
        return tensor

    expected = xmllm.explain(plain, sample.image(), sample.text, [eid], faithfulness=False)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        got = xmllm.explain(offloaded[0], sample.image(), sample.text, [eid], params={eid: {"recompute": True}},
                            faithfulness=False)
    _assert_same(expected, got)
    assert sum(held.values()) < weights / 10


def test_a_model_wholly_on_disk_takes_its_inputs_on_the_cpu(tmp_path, plain, sample) -> None:
    """No block fits: the first parameter is on the meta device, inputs still go to the CPU."""
    loaded = load_model("demo", dtype="float32", device_map="auto", device_memory="cpu=1kB",
                        offload_folder=tmp_path / "off")
    assert set(loaded.provenance()["device_map"]["map"].values()) == {"disk"}
    assert next(loaded.model.parameters()).device.type == "meta"
    assert execution_device(loaded.model).type == "cpu"
    expected = xmllm.explain(plain, sample.image(), sample.text, ["gradient.saliency"], faithfulness=False)
    got = xmllm.explain(loaded, sample.image(), sample.text, ["gradient.saliency"], faithfulness=False)
    _assert_same(expected, got)


# --- a tiny model of another family -----------------------------------------------------------------

TINY_FAMILY = "idefics3"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from tiny_models import build_tiny, missing_dependency

    package = missing_dependency(TINY_FAMILY)
    if package:
        pytest.skip(f"the {TINY_FAMILY} processor needs {package}")
    model, processor = build_tiny(TINY_FAMILY)
    folder = tmp_path_factory.mktemp(f"tiny-{TINY_FAMILY}")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_a_tiny_family_offloaded_to_disk_equals_its_plain_load(tiny_folder, tmp_path) -> None:
    from tiny_models import TEST_IMAGE_SIZES, tiny_image

    plain = load_model(tiny_folder, device="cpu", dtype="float32")
    weights = sum(p.numel() * p.element_size() for p in plain.model.parameters())
    offloaded = load_model(tiny_folder, dtype="float32", device_map="auto",
                           device_memory={"cpu": max(1, weights // 4)}, offload_folder=tmp_path / "off")
    on_disk = [name for name, device in offloaded.provenance()["device_map"]["map"].items() if device == "disk"]
    assert len(on_disk) >= 2
    image = tiny_image(*TEST_IMAGE_SIZES[TINY_FAMILY])
    question = "what colour is the square"
    for eid in REPRESENTATIVE:
        params = {"perturbation.occlusion": {"window": 2}} if eid == "perturbation.occlusion" else None
        expected = xmllm.explain(plain, image, question, [eid], params=params, max_new_tokens=3, faithfulness=False)
        got = xmllm.explain(offloaded, image, question, [eid], params=params, max_new_tokens=3, faithfulness=False)
        _assert_same(expected, got)


# --- the default offload folder ----------------------------------------------------------------------


def test_the_default_offload_folder_is_scratch_under_the_cache_and_removed_after(tmp_path, monkeypatch) -> None:
    import gc

    monkeypatch.setenv("XMLLM_CACHE_DIR", str(tmp_path / "cache"))
    loaded = load_model("demo", dtype="float32", device_map="auto", device_memory={"cpu": DEMO_CPU_LIMIT})
    root = tmp_path / "cache" / "offload"
    folders = list(root.iterdir())
    assert len(folders) == 1 and folders[0].is_dir()
    del loaded
    gc.collect()
    assert not folders[0].exists()


def test_a_killed_process_s_offload_folder_is_removed_by_the_next_load(tmp_path, monkeypatch) -> None:
    import subprocess

    monkeypatch.setenv("XMLLM_CACHE_DIR", str(tmp_path / "cache"))
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / "cache" / "offload" / f"weights-{int(ended.stdout)}-abc"
    stale.mkdir(parents=True)
    (stale / "model.layers.1.weight.dat").write_bytes(b"0" * 16)
    load_model("demo", dtype="float32", device_map="auto", device_memory={"cpu": "1GB"})
    assert not stale.exists()


# --- checking values ------------------------------------------------------------------------------------


def test_device_memory_syntax() -> None:
    assert parse_device_memory("0=20GiB,cpu=64GiB") == {0: 20 << 30, "cpu": 64 << 30}
    assert parse_device_memory({"cuda:1": "1GB", "CPU": 5}) == {1: 10**9, "cpu": 5}
    for bad, said in [("cpu", "DEVICE=SIZE"), ("", "DEVICE=SIZE"), ("x=3GB", "not a GPU index"),
                      ("0=lots", "expected a size"), ("cpu=1GB,cpu=2GB", "given twice"),
                      ("disk=1GB", "disk takes no limit"), ("cpu=0", "positive")]:
        with pytest.raises(DeviceMapError, match=said) as caught:
            parse_device_memory(bad)
        assert "\n" not in str(caught.value) and "--device-memory" in str(caught.value)
    with pytest.raises(DeviceMapError, match="GPU 7 is not available"):
        make_dispatch("auto", "7=20GiB")
    with pytest.raises(DeviceMapError, match="use auto, balanced"):
        make_dispatch("everywhere")
    assert make_dispatch(None) is None
    assert make_dispatch(None, "cpu=1GB").device_map == "auto"  # a limit alone means auto


def test_a_device_and_a_device_map_are_one_line_error() -> None:
    with pytest.raises(XmllmError, match="give one"):
        load_model("demo", device="cpu", device_map="auto")
    with pytest.raises(XmllmError, match="apply to a model loaded here"):
        xmllm.explain(object(), np.zeros((8, 8, 3), np.uint8), "what?", ["attention.raw"], device_map="auto")


# --- the command line ------------------------------------------------------------------------------


def test_explain_with_a_device_map_end_to_end(plain, sample, tmp_path, capsys) -> None:
    image = tmp_path / "in.png"
    sample.image().save(image)
    ids = ["relevancy.chefer", "gradient.saliency"]
    out = tmp_path / "run"
    assert main(["explain", "--image", str(image), "--question", sample.text, "--explainers", ",".join(ids),
                 "--device-map", "auto", "--device-memory", f"cpu={DEMO_CPU_LIMIT}",
                 "--offload-folder", str(tmp_path / "off"), "--out", str(out)]) == 0
    got = xmllm.load_run(out)
    expected = xmllm.explain(plain, sample.image(), sample.text, ids)
    for eid in ids:
        for name, values in expected[eid].maps.items():
            assert np.allclose(got[eid].maps[name], values, rtol=1e-5, atol=1e-7), (eid, name)
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    recorded = manifest["model"]["device_map"]
    assert recorded["strategy"] == "auto" and recorded["blocks"]["disk"] >= 2


def test_ask_with_a_device_map(sample, tmp_path, capsys) -> None:
    image = tmp_path / "in.png"
    sample.image().save(image)
    assert main(["ask", "--image", str(image), "--question", sample.text, "--device-map", "auto",
                 "--device-memory", f"cpu={DEMO_CPU_LIMIT}", "--offload-folder", str(tmp_path / "off"),
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["answer"]


@pytest.mark.parametrize("value", ["0=lots", "cpu", "gpu=3GB", "9=1GB"])
def test_a_bad_device_memory_is_one_line_exit_2_nothing_written(value, sample, tmp_path, capsys) -> None:
    image = tmp_path / "in.png"
    sample.image().save(image)
    out = tmp_path / "run"
    assert main(["explain", "--image", str(image), "--question", sample.text, "--explainers", "attention.raw",
                 "--device-map", "auto", "--device-memory", value, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--device-memory" in err
    assert repr(value) in err or "GPU 9 is not available" in err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]


def test_device_and_device_map_together_is_one_line(sample, tmp_path, capsys) -> None:
    image = tmp_path / "in.png"
    sample.image().save(image)
    assert main(["explain", "--image", str(image), "--question", sample.text, "--explainers", "attention.raw",
                 "--device", "cpu", "--device-map", "auto", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device-map" in err[0]


def test_without_accelerate_the_error_says_how_to_install_it(sample, tmp_path, capsys, monkeypatch) -> None:
    real = importlib.util.find_spec

    def hidden(name, *args, **kwargs):
        return None if name == "accelerate" or name.startswith("accelerate.") else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", hidden)
    image = tmp_path / "in.png"
    sample.image().save(image)
    assert main(["explain", "--image", str(image), "--question", sample.text, "--explainers", "attention.raw",
                 "--device-map", "auto", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install xmllm[offload]" in err[0]
    assert not (tmp_path / "run").exists()


# --- the audit config ----------------------------------------------------------------------------------


def test_the_audit_config_takes_a_device_map(tmp_path) -> None:
    from xmllm.audit import load_config
    from xmllm.audit.config import ConfigError

    def config(**fields):
        path = tmp_path / "audit.yaml"
        lines = ["samples: {type: jsonl, path: samples.jsonl}"] + [f"{key}: {json.dumps(value)}" for key, value in fields.items()]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    loaded = load_config(config(device_map="auto", device_memory="cpu=4MB", offload_folder="off"), {})
    assert loaded.config.device_map == "auto" and loaded.config.device_memory == {"cpu": 4_000_000}
    assert loaded.config.offload_folder == str((tmp_path / "off").resolve())
    plain = load_config(config(), {})
    assert plain.config.results_fingerprint() != loaded.config.results_fingerprint()
    for fields, said in [({"device_map": "everywhere"}, "device_map"), ({"device_memory": "cpu=lots"}, "device_memory"),
                         ({"device": "cpu", "device_map": "auto"}, "give one"),
                         ({"device_memory": {"9": "1GB"}}, "GPU 9")]:
        with pytest.raises(ConfigError, match=said) as caught:
            load_config(config(**fields), {})
        assert "\n" not in str(caught.value)


def test_an_audit_with_a_device_map_equals_the_plain_one(tmp_path, capsys) -> None:
    from audit_sets import write_config, write_set

    write_set(tmp_path / "set", 1)
    options = {"device": "auto", "explainers": {"perturbation.occlusion": {"window": 4}}, "checks": [],
               "faithfulness": {"enabled": False}}
    plain = write_config(tmp_path / "plain.yaml", "demo", output="plain", **options)
    offloaded = write_config(tmp_path / "offloaded.yaml", "demo", output="offloaded", device_map="auto",
                             device_memory={"cpu": DEMO_CPU_LIMIT}, **options)
    assert main(["run", str(plain), "--no-progress"]) == 0
    assert main(["run", str(offloaded), "--no-progress", "--offload-folder", str(tmp_path / "off")]) == 0
    records = {}
    for name in ("plain", "offloaded"):
        [path] = sorted((tmp_path / name / "samples").glob("*/record.json"))
        records[name] = json.loads(path.read_text(encoding="utf-8"))
        arrays = sorted(path.parent.glob("run/*.npz"))
        records[name]["arrays"] = {f"{p.name} {k}": v for p in arrays for k, v in np.load(p).items()}
    a, b = records["plain"], records["offloaded"]
    assert a["status"] == b["status"] == "ok" and a["answer"] == b["answer"]
    assert sorted(a["arrays"]) == sorted(b["arrays"]) and a["arrays"]
    for key, values in a["arrays"].items():
        assert np.allclose(b["arrays"][key], values, rtol=1e-5, atol=1e-7), key
    for key, value in a["reliance"].items():
        assert math.isclose(b["reliance"][key], value, rel_tol=1e-5, abs_tol=1e-7), key
    [manifest] = (tmp_path / "offloaded" / "samples").glob("*/run/manifest.json")
    recorded = json.loads(manifest.read_text(encoding="utf-8"))["model"]["device_map"]
    assert recorded["offload_folder"] == str(tmp_path / "off") and recorded["blocks"]["disk"] >= 2


def test_training_compare_loads_its_other_checkpoint_dispatched_alike(plain, offloaded, sample) -> None:
    expected = xmllm.explain(plain, sample.image(), sample.text, ["training.compare"], faithfulness=False)
    got = xmllm.explain(offloaded[0], sample.image(), sample.text, ["training.compare"], faithfulness=False)
    _assert_same(expected, got)


def test_the_randomisation_check_refuses_an_offloaded_model_in_one_line(offloaded, sample) -> None:
    from xmllm.explainers.metrics.sanity import randomisation_check
    from xmllm.explainers.prepared import ExplainSample, prepare

    loaded = offloaded[0]
    prepared = prepare(loaded, ExplainSample([sample.image()], sample.text))
    with pytest.raises(XmllmError, match="offloaded") as err:
        randomisation_check(loaded, [prepared], ["gradient.saliency"])
    assert "\n" not in str(err.value)
