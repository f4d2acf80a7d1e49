"""The Python API on the real demo model: load, explain, show, save, load back; the example
notebook executed on a real kernel; the CLI and the API give the same numbers."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from html_tree import parse

import xmllm
from xmllm import XmllmError
from xmllm.cli import main
from xmllm.explainers.demo.samples import generate_samples

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "site" / "notebook.ipynb"
THREE = ["relevancy.chefer", "gradient.integrated", "perturbation.occlusion"]


@pytest.fixture(scope="module")
def model():
    return xmllm.load_model("demo", device="cpu")


@pytest.fixture(scope="module")
def sample():
    return generate_samples(1, seed=0, question_types=["colour"])[0]


@pytest.fixture(scope="module")
def run(model, sample):
    return xmllm.explain(model, sample.image(), sample.text, THREE)


def test_explain_returns_a_run_with_answer_explanations_and_provenance(run, sample) -> None:
    assert run.ids == THREE and len(run) == 3 and "perturbation.occlusion" in run
    assert run.answer["text"] == sample.answer  # the trained demo answers this one right
    assert len(run.answer["probs"]) == len(run.answer["tokens"]) >= 1 and 0 < run.answer["probs"][0] <= 1
    assert run["perturbation.occlusion"].maps["image.answer"].shape == (8, 8)
    provenance = run.manifest
    assert len(provenance["model"]["weights_sha256"]) == 64 and provenance["seed"] == 0
    assert provenance["sample"]["sha256"] and provenance["versions"]["torch"]
    # every declared parameter of every explainer is recorded with its value
    occlusion = xmllm.explainers.registry.get_explainer("perturbation.occlusion")
    assert set(occlusion.Params.names()) <= set(run["perturbation.occlusion"].params)
    with pytest.raises(KeyError, match="holds relevancy.chefer"):
        run["attention.raw"]


def test_the_same_inputs_and_seed_give_the_same_numbers(model, sample, run) -> None:
    again = xmllm.explain(model, np.asarray(sample.image()), sample.text, THREE)  # the image as an array
    for eid in THREE:
        for name, values in run[eid].maps.items():
            np.testing.assert_array_equal(again[eid].maps[name], values)


def test_inline_reports_are_isolated_frames_of_the_light_view(run) -> None:
    tree = parse(run._repr_html_())
    assert [e.tag for e in tree.iter()][1:] == ["iframe"]
    attrs = tree.find("iframe").attrs
    assert attrs["sandbox"] == ""  # the light view: no scripts, no same origin; two reports share nothing
    inner = parse(attrs["srcdoc"])
    assert not any((e.attrs.get("src") or "").strip() for e in inner.find_all("script"))  # all inline
    assert not any((e.attrs.get("href") or "").startswith("http") for e in inner.find_all("link"))
    assert run.answer["text"] in inner.text
    for eid in THREE:
        assert inner.find_all(id=eid.replace(".", "-")) or eid in inner.text
    one = parse(parse(run["relevancy.chefer"]._repr_html_()).find("iframe").attrs["srcdoc"])
    assert "relevancy.chefer" in one.text and "perturbation.occlusion" not in one.text


def test_save_writes_what_the_cli_writes_and_load_run_reads_it_back(run, tmp_path) -> None:
    folder = run.save(tmp_path / "api")
    assert sorted(p.name for p in folder.iterdir()) == ["explanations.npz", "image_0.png", "manifest.json", "report.html"]
    back = xmllm.load_run(folder)
    assert back.ids == run.ids and back.answer == run.answer and back.prepared is None
    for eid in run.ids:
        assert back[eid].params == run[eid].params
        for name, values in run[eid].maps.items():
            np.testing.assert_array_equal(back[eid].maps[name], values)
    assert back.report_html() == (folder / "report.html").read_text(encoding="utf-8")


def test_the_cli_is_a_wrapper_over_the_api(run, sample, tmp_path, capsys) -> None:
    image = tmp_path / "in.png"
    sample.image().save(image)
    assert main(["explain", "--image", str(image), "--question", sample.text, "--explainers", ",".join(THREE),
                 "--out", str(tmp_path / "cli")]) == 0
    cli = xmllm.load_run(tmp_path / "cli")
    for eid in THREE:
        for name, values in run[eid].maps.items():
            np.testing.assert_array_equal(cli[eid].maps[name], values)


def test_bad_api_input_is_a_one_line_error_before_model_work(model) -> None:
    image = np.zeros((16, 16, 3), dtype=np.uint8)
    cases = [
        (dict(params={"perturbation.occlusion": {"window": 0}}), "parameter window=0 must be an integer >= 1"),
        (dict(params={"perturbation.occlusion": {"windw": 2}}), "unknown parameter 'windw'"),
        (dict(params={"gradient.saliency": {}}), "'gradient.saliency', which is not being run"),
    ]
    for kwargs, fragment in cases:
        with pytest.raises(XmllmError, match=re.escape(fragment)):
            xmllm.explain("no/such/model", image, "What colour?", ["perturbation.occlusion"], **kwargs)
    with pytest.raises(XmllmError, match="array image must be H x W or H x W x 3"):
        xmllm.explain(model, np.zeros((4, 4, 5)), "What colour?", ["perturbation.occlusion"])
    with pytest.raises(XmllmError, match="must be a non-empty string"):
        xmllm.explain(model, image, "  ", ["perturbation.occlusion"])


def test_catalog_is_a_function_and_a_package() -> None:
    assert len(xmllm.catalog().leaves()) == 16
    from xmllm.catalog import load_catalog

    assert xmllm.catalog().model_dump() == load_catalog().model_dump()


@pytest.mark.slow
def test_the_example_notebook_runs_on_a_real_kernel(tmp_path, run) -> None:
    """``site/notebook.ipynb`` executed by nbclient on an ipykernel: it explains one sample with
    three explainers, shows the report, saves and reloads the run; the reloaded arrays equal those
    computed here in another process."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert len(html) == 1 and html[0].startswith("<iframe") and "perturbation.occlusion" in html[0]
    report = parse(html[0]).find("iframe").attrs["srcdoc"]
    assert "bokeh" not in report.lower() and run.answer["text"] in report and len(html[0]) < 300_000
    printed = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "arrays equal: True" in printed
    saved = xmllm.load_run(tmp_path / "runs" / "notebook")
    assert saved.ids == run.ids
    for eid in run.ids:
        for name, values in run[eid].maps.items():
            np.testing.assert_array_equal(saved[eid].maps[name], values)


def test_the_notebook_page_renders_its_cells() -> None:
    from xmllm.site import notebook as page

    text = page.render(json.loads(NOTEBOOK.read_text(encoding="utf-8")))
    assert "```python" in text and "xmllm.explain(" in text and "run.show()" in text
    assert "[Download the notebook](../notebook.ipynb)" in text


def test_api_functions_have_docstrings_with_examples() -> None:
    import xmllm.api as api

    for name in ("load_model", "explain", "load_run", "evaluate", "audit", "catalog"):
        doc = getattr(api, name).__doc__
        assert doc and len(doc.split()) > 15, name
    for name in ("load_model", "explain", "evaluate", "audit", "catalog"):
        assert "Example:" in getattr(api, name).__doc__, name
    assert sys.modules["xmllm"].__all__
