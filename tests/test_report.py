"""HTML reports rendered from real saved runs (real explainers on a tiny LLaVA), parsed back.

Every check reads the written file: the page's markup through ``html.parser`` and the numbers
the interactive views plot from the page's own Bokeh document.
"""
from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


from html_tree import bokeh_models, parse
from loaded_models import answer_probability
from report_runs import ANSWER_TOKENS, EXPLAINERS, HOSTILE, IMAGE_SIZE, make_run, tiny_llava
from tiny_models import tiny_image

from xmllm.explainers.prepared import ExplainSample
from xmllm.explainers.explanation import Explanation, Target, load_explanations, save_explanations
from xmllm.explainers.registry import get_explainer
from xmllm.cli import main
from xmllm import XmllmError
from xmllm.report.explained import render_report, write_report
from xmllm.report.about import leaves_by_explainer
from xmllm.report.slabs import HEAD_MEAN, MANTISSA_BITS, Slab, build_slab, compact, fit_budget
from xmllm.pipeline import make_plan
from xmllm.runner import run_explainers

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

ROUNDING = 2.0 ** -MANTISSA_BITS  # relative error the page's values may carry


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    make_run(out)
    write_report(out)
    return out


@pytest.fixture(scope="module")
def page(run_dir) -> str:
    return (run_dir / "report.html").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def tree(page):
    return parse(page)


def _manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))


def test_run_folder_holds_image_and_grid_layouts(run_dir) -> None:
    manifest = _manifest(run_dir)
    assert manifest["sample"]["images"] == ["image_0.png"]
    with Image.open(run_dir / "image_0.png") as saved:
        assert np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(tiny_image(32, 32)))
    (layout,) = manifest["layouts"]
    (grid,) = layout["grids"]
    shapes = {e["explainer"]: e["shapes"] for e in manifest["explanations"]}
    assert grid["map"] == "image" and [grid["rows"], grid["cols"]] == shapes["attention.rollout"]["image.answer"]


def test_every_explainer_has_its_section(run_dir, tree) -> None:
    sections = {s.attrs["data-explainer"]: s for s in tree.find_all("section") if "data-explainer" in s.attrs}
    assert list(sections) == list(EXPLAINERS)
    for eid, section in sections.items():
        cls = get_explainer(eid)
        assert section.find("h2").text.strip() == cls.title
        assert cls.summary in section.with_class("summary")[0].text
        links = {a.attrs["href"] for a in section.find_all("a")}
        for citation in cls.citations:
            assert f"https://arxiv.org/abs/{citation.arxiv}" in links
        leaf_text = " ".join(e.text for e in section.with_class("leaves"))
        for leaf in leaves_by_explainer()[eid]:
            assert leaf.id in leaf_text
        params = section.with_class("kv-params")
        header = next(e for e in _manifest(run_dir)["explanations"] if e["explainer"] == eid)
        for key in header["params"]:
            assert any(th.text == key for t in params for th in t.find_all("th"))
        views = section.with_class("view")
        assert views, eid
        for view in views:
            assert view.find("img", **{"class": "static"}).attrs["src"].startswith("data:image/png;base64,")
            assert view.with_class("interactive")
    provenance = tree.find("section", id="provenance").text
    manifest = _manifest(run_dir)
    for value in (manifest["model"]["weights_sha256"] or "", manifest["sample"]["sha256"], str(manifest["seed"]),
                  manifest["versions"]["torch"], manifest["versions"]["bokeh"]):
        assert value in provenance


def test_answer_tokens_with_probabilities(run_dir, tree) -> None:
    answer = _manifest(run_dir)["answer"]
    items = tree.find("ol", id="answer-tokens").find_all("li")
    assert len(items) == len(answer["tokens"]) == ANSWER_TOKENS
    for item, prob in zip(items, answer["probs"]):
        assert float(item.attrs["data-prob"]) == pytest.approx(prob, abs=1e-6)
        assert f"{100 * prob:.1f}%" in item.with_class("prob")[0].text


def test_hostile_question_appears_only_escaped(page, tree) -> None:
    assert "<script>alert(1)" not in page
    assert tree.find("p", id="question-text").text == HOSTILE
    assert tree.find("h1", id="question").text == HOSTILE
    assert HOSTILE in tree.find("title").text
    scripts = tree.find_all("script")
    assert all("src" not in s.attrs for s in scripts)
    assert not any("alert(1)</script" in s.text for s in scripts)
    run = json.loads(tree.find("script", id="xmllm-run").text)
    assert run["sample"]["question"] == HOSTILE


def test_page_requests_nothing_from_elsewhere(tree, page) -> None:
    for el in tree.iter():
        for attr in ("src", "srcset", "poster", "data", "action", "formaction"):
            value = el.attrs.get(attr)
            assert value is None or value.startswith("data:"), (el.tag, attr, value[:60])
        if el.tag == "link":
            raise AssertionError(f"<link> in a self-contained page: {el.attrs}")
        if el.tag == "a":  # navigation only when clicked, never loaded: papers on arXiv, anchors in the page
            href = el.attrs["href"]
            assert href.startswith("#") or href.startswith("https://arxiv.org/abs/"), href
    assert "url(http" not in page and "url(//" not in page and "@import" not in page
    policy = next(m.attrs["content"] for m in tree.find_all("meta") if m.attrs.get("http-equiv") == "Content-Security-Policy")
    assert "default-src 'none'" in policy and "connect-src 'none'" in policy


def test_page_plots_the_saved_arrays(run_dir, page) -> None:
    models = bokeh_models(page)
    exps = {e.explainer: e for e in load_explanations(run_dir / "explanations.npz", run_dir / "manifest.json")}
    raw = exps["attention.raw"].maps["image"]  # (T, L, H, rows, cols)
    store = models["attention.raw:image:store"]["data"]["v"]
    expected = np.concatenate([raw.mean(axis=2, keepdims=True), raw], axis=2)  # the 'mean' head first
    np.testing.assert_allclose(store.reshape(expected.shape), expected, rtol=ROUNDING, atol=1e-12)
    shown = models["attention.raw:image:cells"]["data"]["value"]  # first view: token 0, last layer, mean head
    np.testing.assert_allclose(shown, expected[0, -1, 0].ravel(), rtol=ROUNDING, atol=1e-12)
    layer = models["attention.raw:control:layer"]
    assert layer["type"] == "Slider" and layer["end"] == raw.shape[1] - 1 and layer["value"] == raw.shape[1] - 1
    head = models["attention.raw:control:head"]
    assert [o[1] for o in head["options"]] == [HEAD_MEAN] + [str(h) for h in range(raw.shape[2])]
    tokens = models["attention.rollout:control:answer_token"]["options"]  # per token, then the '.answer' map
    assert len(tokens) == ANSWER_TOKENS + 1 and tokens[-1][1] == "whole answer"
    modality = models["relevancy.modality:share:bars"]["data"]["label"]
    assert list(modality) == exps["relevancy.modality"].meta["modalities"]
    strip = models["attention.raw:image:strip"]["data"]
    assert len(strip["token"]) == ANSWER_TOKENS and set(strip["colour"]) == {"#d9d9d9"}


IMAGE_MAP_EXPLAINERS = ("attention.raw", "attention.rollout", "perturbation.occlusion")
"""Those of :data:`EXPLAINERS` that give an image map; the others have no faithfulness block."""


def test_each_image_map_shows_its_deletion_and_insertion_areas(run_dir, tree) -> None:
    """The areas shown in each map's section, parsed back, equal the areas recomputed from the
    saved map through the metric classes on a fresh prepare of the same model and sample."""
    from xmllm.explainers.prepared import prepare
    from xmllm.explainers.metrics import MetricInputs, get_metric, primary_image_map

    manifest = _manifest(run_dir)
    assert manifest["timings_seconds"]["faithfulness"] > 0
    settings = manifest["faithfulness"]
    sections = {s.attrs["data-explainer"]: s for s in tree.find_all("section") if "data-explainer" in s.attrs}
    for eid in set(EXPLAINERS) - set(IMAGE_MAP_EXPLAINERS):
        assert not sections[eid].with_class("faithfulness"), eid
    loaded = tiny_llava()
    prepared = prepare(loaded, ExplainSample([tiny_image(*IMAGE_SIZE)], HOSTILE, id="tiny-sample", expected="red"))
    exps = {e.explainer: e for e in load_explanations(run_dir / "explanations.npz", run_dir / "manifest.json")}
    inputs = MetricInputs(prepared, baseline=settings["baseline"], steps=settings["steps"], seed=settings["seed"])
    for eid in IMAGE_MAP_EXPLAINERS:
        (block,) = sections[eid].with_class("faithfulness")
        rows = {r.attrs["data-kind"]: r for r in block.find("table").find_all("tr") if "data-kind" in r.attrs}
        assert sorted(rows) == ["deletion", "insertion"]
        scored = primary_image_map(exps[eid])
        assert f"ranked by {scored.name}" in " ".join(block.text.split())
        for kind, row in rows.items():
            recomputed = get_metric(f"{kind}_area")().compute([scored.values], inputs)[0]
            shown = float(row.attrs["data-area"])
            assert shown == pytest.approx(recomputed, rel=1e-6, abs=1e-12), (eid, kind)
            assert row.with_class("area")[0].text.strip() == f"{shown:.4g}"
            curve = block.find("polyline", **{"class": f"curve-{kind}"})
            values = [float(v) for v in curve.attrs["data-values"].split()]
            assert len(values) == settings["steps"] + 1 == len(curve.attrs["points"].split())
            assert values == pytest.approx(inputs.curves(kind, [scored.values])[0].tolist(), rel=1e-6, abs=1e-12)
    # both curves start and end at the unperturbed input and the all-baseline image
    full = answer_probability(loaded, prepared, prepared.inputs["pixel_values"])
    deletion = [float(v) for v in sections["attention.rollout"].find(
        "polyline", **{"class": "curve-deletion"}).attrs["data-values"].split()]
    assert deletion[0] == pytest.approx(full, rel=1e-5)


def test_a_run_without_faithfulness_shows_none(tmp_path) -> None:
    sample = ExplainSample([tiny_image(*IMAGE_SIZE)], "what colour is it", id="tiny-sample")
    result = run_explainers(tiny_llava(), sample, make_plan(["perturbation.occlusion"], seed=0), faithfulness=False)
    assert "faithfulness" not in result.manifest and "faithfulness" not in result.manifest["timings_seconds"]
    result.save(tmp_path / "run", report=False)
    tree = parse(render_report(tmp_path / "run"))
    assert not tree.with_class("faithfulness")


def test_image_is_read_from_the_run_folder(run_dir, tmp_path) -> None:
    moved = tmp_path / "moved"
    shutil.copytree(run_dir, moved)
    edited = tiny_image(32, 32, seed=7)
    edited.save(moved / "image_0.png")
    tree = parse(render_report(moved))
    uri = tree.find("section", id="sample").find("img").attrs["src"]
    shown = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB")
    factor = shown.width // 32  # small images are enlarged by an integer factor, nearest neighbour
    assert np.array_equal(np.asarray(shown)[::factor, ::factor], np.asarray(edited))


def test_bad_run_folders_fail_in_one_line(run_dir, tmp_path) -> None:
    def broken(name: str, edit) -> Path:
        folder = tmp_path / name
        shutil.copytree(run_dir, folder)
        edit(folder)
        return folder

    cases = {
        str(tmp_path / "no-manifest" / "manifest.json"): broken("no-manifest", lambda f: (f / "manifest.json").unlink()),
        str(tmp_path / "no-arrays" / "explanations.npz"): broken("no-arrays", lambda f: (f / "explanations.npz").unlink()),
        str(tmp_path / "no-image" / "image_0.png"): broken("no-image", lambda f: (f / "image_0.png").unlink()),
        "manifest.json: not valid JSON (line 1": broken("bad-json", lambda f: (f / "manifest.json").write_text("{")),
    }
    for needle, folder in cases.items():
        (folder / "report.html").unlink()
        with pytest.raises(XmllmError) as info:
            write_report(folder)
        message = str(info.value)
        assert "\n" not in message and needle in message, message
        assert not (folder / "report.html").exists()


def test_failed_render_keeps_the_previous_report(run_dir, tmp_path) -> None:
    folder = tmp_path / "run"
    shutil.copytree(run_dir, folder)
    before = (folder / "report.html").read_bytes()
    (folder / "explanations.npz").write_bytes(b"not an archive")
    with pytest.raises(XmllmError, match="explanations.npz"):
        write_report(folder)
    assert (folder / "report.html").read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in run_dir.iterdir())


def test_report_written_elsewhere_atomically(run_dir, tmp_path) -> None:
    out = tmp_path / "nested" / "page.html"
    assert write_report(run_dir, out) == out
    assert out.read_text(encoding="utf-8").startswith("<!doctype html>")
    assert [p.name for p in out.parent.iterdir()] == ["page.html"]


def test_new_explainers_render_by_their_axes(run_dir, tmp_path) -> None:
    """Arrays an unknown explainer saves render from their axis names alone."""
    folder = tmp_path / "generic"
    shutil.copytree(run_dir, folder)
    manifest = _manifest(folder)
    exps = load_explanations(folder / "explanations.npz", folder / "manifest.json")
    target = exps[0].target
    rng = np.random.default_rng(0)
    novel = Explanation("example.unregistered", {"top_k": 5}, target, scores={"agreement": 0.5},
                        meta={"layers": [4, 9], "vocab_labels": ["a", "b", "c", "<d>", "e"]})
    novel.add("rank", rng.normal(size=(2, ANSWER_TOKENS, 5)), ("layer", "answer_token", "vocab"))
    novel.add("image.lens", rng.random(size=(2, ANSWER_TOKENS, 4, 4)), ("layer", "answer_token", "row", "col"))
    novel.add("total", np.array(3.0), ())
    novel.add("neurons", rng.random(size=5000), ("neuron",))
    save_explanations([*exps, novel], folder / "explanations.npz", folder / "manifest.json",
                      extra={k: v for k, v in manifest.items() if k != "explanations"})
    page = render_report(folder)
    section = parse(page).find("section", **{"data-explainer": "example.unregistered"})
    kinds = [sorted(v.classes()) for v in section.with_class("view")]
    assert ["view", "view-image"] in kinds and ["view", "view-heatmap"] in kinds and ["view", "view-table"] in kinds
    table = section.find("table", **{"class": "arrays"}).text
    assert "total" in table and "neurons" in table and "neuron" in table
    assert "not registered" in section.with_class("summary")[0].text
    models = bokeh_models(page)
    layer = models["example.unregistered:control:layer"]  # labels from meta['layers']
    assert layer["value"] == 1 and layer["format"]["args"]["labels"] == ["4", "9"]
    cells = models["example.unregistered:rank:cells"]["data"]
    assert list(cells["col"][:5]) == ["a", "b", "c", "<d>", "e"]  # labels from meta['vocab_labels']
    assert "example.unregistered:image.lens:strip" in models


def test_explain_command_writes_the_report(tmp_path, capsys) -> None:
    loaded = tiny_llava()
    model_dir, out = tmp_path / "model", tmp_path / "out"
    loaded.model.save_pretrained(model_dir)
    loaded.processor.save_pretrained(model_dir)
    image = tmp_path / "picture.png"
    tiny_image(32, 32).save(image)
    code = main(["explain", "--model", str(model_dir), "--image", str(image), "--question", "what colour is it",
                 "--explainers", "attention.rollout", "--out", str(out), "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"report: {out / 'report.html'}" in printed
    tree = parse((out / "report.html").read_text(encoding="utf-8"))
    assert tree.find("p", id="question-text").text == "what colour is it"
    assert [s.attrs["data-explainer"] for s in tree.find_all("section") if "data-explainer" in s.attrs] == [
        "attention.rollout"]


def test_dataset_scope_run_lists_samples_and_draws_points(tmp_path) -> None:
    """A dataset-scope run (``samples`` instead of ``sample``, no images) with a real projection."""
    from xmllm.explainers.registry import get_explainer

    loaded = tiny_llava()
    samples = [ExplainSample([tiny_image(32, 32, seed=k)], f"what colour is shape {k}", id=f"s{k}", expected="red")
               for k in range(3)]
    exp = get_explainer("embedding.projection")().explain(loaded, samples, image_points=4, text_points=4)
    manifest = {"scope": "dataset", "seed": 0, "model": loaded.provenance(), "explainers": [exp.explainer],
                "samples": [{"id": x.id, "question": x.question, "expected": x.expected} for x in samples]}
    save_explanations([exp], tmp_path / "explanations.npz", tmp_path / "manifest.json", extra=manifest)
    page = render_report(tmp_path)
    tree = parse(page)
    rows = tree.find("table", **{"class": "kv samples-table"}).find_all("tr")[1:]
    assert [r.find_all("td")[0].text for r in rows] == ["s0", "s1", "s2"]
    assert tree.find("h1", id="question").text == "embedding.projection over 3 samples"
    section = tree.find("section", **{"data-explainer": "embedding.projection"})
    assert ["view", "view-scatter"] in [sorted(v.classes()) for v in section.with_class("view")]
    points = bokeh_models(page)["embedding.projection:projection:points"]["data"]
    last = exp.maps["projection"][-1]  # the slider starts on the last layer
    np.testing.assert_allclose(points["x"], last[:, 0], rtol=ROUNDING)
    np.testing.assert_allclose(points["y"], last[:, 1], rtol=ROUNDING)
    assert list(points["point_modality"]) == exp.meta["point_modality"]


def test_json_in_script_cannot_end_the_element() -> None:
    from xmllm.report.render import script_json

    value = {"q": "</script><script>alert(1)</script>&'\u2028\u2029"}
    text = str(script_json(value))
    assert not any(c in text for c in "<>&'\u2028\u2029")
    assert json.loads(text) == value


def test_compact_rounds_to_the_stated_precision() -> None:
    values = np.array([1.0, -3.14159265, 1e-20, 7e30, np.nan, np.inf, -np.inf, 0.0], dtype=np.float32)
    out = compact(values)
    finite = np.isfinite(values)
    np.testing.assert_allclose(out[finite], values[finite], rtol=ROUNDING, atol=0)
    assert np.isnan(out[4]) and out[5] == np.inf and out[6] == -np.inf
    assert (out.view(np.uint32) & ((1 << (23 - MANTISSA_BITS)) - 1) == 0)[finite].all()


def test_big_attention_is_cut_by_heads_then_layers_with_notes() -> None:
    rng = np.random.default_rng(0)
    values = rng.random((2, 8, 16, 6, 6)).astype(np.float32)
    values[:, :, 5] *= 10  # head 5 holds the most mass
    exp = Explanation("attention.raw", {}, Target("ab", [1, 2], ["a", "b"], [5, 6], [0.5, 0.5]))
    exp.add("image", values, ("answer_token", "layer", "head", "row", "col"))
    full = build_slab(exp, "image", 2)
    assert full.values.shape == (2, 8, 17, 6, 6) and not full.notes
    np.testing.assert_allclose(full.values[:, :, 0], values.mean(axis=2), rtol=1e-6)
    cut = fit_budget(full, budget=2 * 8 * 5 * 36)
    heads = cut.lead[2].labels
    assert heads[0] == HEAD_MEAN and "5" in heads and cut.values.size <= 2 * 8 * 5 * 36
    np.testing.assert_allclose(cut.values[:, :, 0], values.mean(axis=2), rtol=1e-6)  # mean over all 16
    assert any("head: 4 of 16 kept" in n for n in cut.notes)
    smaller = fit_budget(full, budget=2 * 4 * 2 * 36)
    layers = smaller.lead[1].labels
    assert layers[-1] == "7" and len(layers) < 8 and any("evenly spaced" in n for n in smaller.notes)
    assert isinstance(smaller, Slab)


def test_a_run_renders_to_the_same_bytes_every_time(run_dir, page, tmp_path) -> None:
    """Bokeh's ids come from a process-wide counter and uuid4: seeded by the run, a re-render (after
    other pages moved the counter on) is byte-identical, and another sample's page gets other ids."""
    from bokeh.plotting import figure
    from bokeh.embed import components

    components(figure())  # the process's counter and uuids move on
    assert render_report(run_dir) == page
    ids = set(re.findall(r'id="([0-9a-f-]{36})"', page))
    assert ids, "the page holds Bokeh roots"
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    manifest = _manifest(other)
    manifest["sample"]["sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    assert not ids & set(re.findall(r'id="([0-9a-f-]{36})"', render_report(other)))
