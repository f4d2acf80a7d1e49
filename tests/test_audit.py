"""``xmllm run``: config validation, hostile input shown as text everywhere, bad images recorded
per sample, reproducible results, and the site section; real forwards of the random demo model."""
from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image
from audit_sets import HOSTILE, compare_outputs, write_config, write_set

from xmllm.explainers.demo.samples import generate_samples
from xmllm.audit import ConfigError, load_config, run_audit
from xmllm import XmllmError



# --- parsing HTML back ----------------------------------------------------------------------------


class Tree(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.scripts: list[tuple[dict[str, str | None], str]] = []
        self._in_script: dict[str, str | None] | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "script":
            self._in_script = dict(attrs)
            self.scripts.append((self._in_script, ""))

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = None

    def handle_data(self, data):
        if self._in_script is not None:
            attrs, text = self.scripts[-1]
            self.scripts[-1] = (attrs, text + data)
        else:
            self.text.append(data)


def parse(html: str) -> Tree:
    tree = Tree()
    tree.feed(html)
    tree.close()
    return tree


def assert_inert(tree: Tree) -> None:
    """No element or attribute that the hostile strings could have made."""
    for tag, attrs in tree.tags:
        assert not (tag == "img" and attrs.get("src") == "x"), "hostile <img> became an element"
        assert not any(k.startswith("on") for k in attrs), f"event handler attribute on <{tag}>"
        assert tag != "u", "hostile <u> became an element"


# --- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory, model):
    """Two samples, the first hostile (its name in the config too), with per-sample reports."""
    root = tmp_path_factory.mktemp("audit-hostile")
    write_set(root / "set", 2, hostile=True)
    cfg = write_config(root / "audit.yaml", model, reports=True, checks=["blank_image", "pope"])
    yaml_text = cfg.read_text(encoding="utf-8").replace('"name": "test audit"', '"name": ' + json.dumps(HOSTILE))
    cfg.write_text(yaml_text, encoding="utf-8")
    loaded = load_config(cfg)
    outcome = run_audit(loaded, progress=False)
    return loaded, outcome


@pytest.fixture(scope="module")
def bad_images_run(tmp_path_factory, model):
    """Five samples with odd or broken images; no explainer, check or report (the images are the test)."""
    root = tmp_path_factory.mktemp("audit-bad-images")
    write_set(root / "set", 0, bad_images=True)
    cfg = write_config(root / "audit.yaml", model, explainers={}, checks=[], faithfulness={"enabled": False})
    loaded = load_config(cfg)
    return loaded, run_audit(loaded, progress=False)


# --- config validation ------------------------------------------------------------------------------


@pytest.mark.parametrize("body, expected", [
    ("samples: {type: jsonl, path: a.jsonl}\nexplainers: [nope.missing]\n", "field explainers: unknown explainer 'nope.missing'"),
    ("samples: {type: jsonl, path: a.jsonl}\nsampels: 1\n", "field sampels: unknown field"),
    ("name: x\n", "field samples: Field required"),
    ("samples: {type: parquet, path: a}\n", "field samples"),
    ("samples: {type: jsonl, path: a.jsonl}\nexecutor: {kind: ray, workers: 0}\n", "field executor.workers"),
    ("samples: {type: jsonl, path: a.jsonl}\nexplainers: [benchmark.pope]\n", "runs over a whole sample set"),
    ("samples: {type: jsonl, path: a.jsonl}\nchecks: [psychic]\n", "field checks: unknown check 'psychic'"),
    ("samples: {type: jsonl, path: a.jsonl}\nfaithfulness: {baseline: '<i>'}\n", "field faithfulness.baseline"),
    ("samples: !!python/object/apply:os.system ['echo pwned']\n", "read safely: no Python tags"),
    ("name: !!python/object:builtins.object {}\n", "c.yaml:1:"),
    ("- just\n- a list\n", "must be a mapping"),
    ("name: [unclosed\n", "YAML syntax error"),
    ("name: a\noutput: x\noutput: y\n", "duplicate key 'output'"),
    ("samples: {type: jsonl, path: a.jsonl}\nexplainers: {perturbation.occlusion: {window: 2, window: 3}}\n",
     "c.yaml:2: explainers.perturbation.occlusion.window: duplicate key 'window'"),
    ("samples: {type: jsonl, path: a.jsonl}\ndevice: quantum\n", "field device: unknown device 'quantum'"),
    ("samples: {type: jsonl, path: a.jsonl}\nexplainers: {perturbation.occlusion: {windw: 2}}\n",
     "perturbation.occlusion: unknown parameter 'windw'"),
    ("samples: {type: jsonl, path: a.jsonl}\nexplainers: {perturbation.occlusion: {window: 0}}\n",
     "parameter window=0 must be an integer >= 1"),
])
def test_config_errors_are_one_line_naming_the_field(tmp_path, body, expected):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(body, encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    message = str(err.value)
    assert expected in message and "\n" not in message and str(cfg) in message


def test_a_config_with_the_old_probes_key_is_one_line_saying_to_rename_it(tmp_path, capsys):
    """``probes:`` (the key's name in xmllm 0.2) is refused before any model work, even when the
    rest of the config is fine: exit 2, one line naming the file and the new key, nothing written."""
    from xmllm.cli import main

    write_set(tmp_path / "set", 1)
    cfg = write_config(tmp_path / "old.yaml", tmp_path / "no-model", probes=["blank_image"])
    assert main(["run", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert str(cfg) in err and "rename the key 'probes:' to 'checks:'" in err and "\n" not in err
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.yaml", "set"]


def test_sample_set_errors_stop_before_model_work(tmp_path):
    """Empty questions, paths leaving the set's folder and absolute paths: one-line errors at
    validation, naming file, line and field (the model named here does not even exist)."""
    (tmp_path / "set").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    cases = {
        '{"id": "a", "image": "x.png", "question": "   "}': "field 'question' must be a non-empty string",
        '{"id": "a", "image": "../outside.png", "question": "q"}': "field 'image' leaves the sample set's folder",
        json.dumps({"id": "a", "image": str(tmp_path / "outside.png"), "question": "q"}): "absolute path",
    }
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "no-model")
    for line, expected in cases.items():
        (tmp_path / "set" / "samples.jsonl").write_text(line + "\n", encoding="utf-8")
        with pytest.raises(XmllmError) as err:
            run_audit(load_config(cfg), progress=False)
        assert expected in str(err.value) and "samples.jsonl:1" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()  # nothing written


def test_absolute_paths_only_when_allowed(tmp_path, model):
    s = generate_samples(1, 0)[0]
    s.image().save(tmp_path / "abs.png")
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "samples.jsonl").write_text(json.dumps(
        {"id": "abs", "image": str(tmp_path / "abs.png"), "question": s.text, "answer": s.answer}) + "\n")
    cfg = write_config(tmp_path / "c.yaml", model, allow_absolute_paths=True, checks=[], faithfulness={"enabled": False})
    outcome = run_audit(load_config(cfg), progress=False)
    assert outcome.total == 1 and outcome.failed == 0


def test_hf_dataset_needs_datasets_or_reads_one(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("samples: {type: hf_dataset, path: ds}\n", encoding="utf-8")
    (tmp_path / "ds").mkdir()
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(XmllmError, match="pip install datasets"):
            run_audit(load_config(cfg), progress=False)
    else:  # pragma: no cover - only where datasets is installed
        with pytest.raises(XmllmError, match="not a dataset saved with save_to_disk"):
            run_audit(load_config(cfg), progress=False)


def test_image_folder_with_csv(tmp_path, model):
    samples = generate_samples(2, 1)
    (tmp_path / "imgs").mkdir()
    rows = ["image,question,answer,id"]
    for s in samples:
        s.image().save(tmp_path / "imgs" / f"{s.id}.png")
        rows.append(f"{s.id}.png,\"{s.text}\",{s.answer},{s.id}")
    (tmp_path / "q.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    cfg = write_config(tmp_path / "c.yaml", model, samples={"type": "image_folder", "folder": "imgs", "csv": "q.csv"},
                       checks=[], faithfulness={"enabled": False})
    outcome = run_audit(load_config(cfg), progress=False)
    summary = json.loads((outcome.out / "audit.json").read_text())
    assert [r["id"] for r in summary["samples"]] == [s.id for s in samples]
    assert all(r["status"] == "ok" and r["answer"] for r in summary["samples"])
    (tmp_path / "q.csv").write_text("image,question\n../escape.png,q\n", encoding="utf-8")
    with pytest.raises(XmllmError, match=r"q\.csv:2: field 'image' leaves"):
        run_audit(load_config(cfg), progress=False)


# --- a real run on hostile and bad input ------------------------------------------------------------


def test_bad_images_fail_alone_and_odd_modes_work(bad_images_run):
    loaded, outcome = bad_images_run
    data = json.loads((outcome.out / "audit.json").read_text(encoding="utf-8"))
    rows = {r["id"]: r for r in data["samples"]}
    assert outcome.total == 5 and outcome.failed == 2 and data["counts"]["failed"] == 2
    for sid, needle in (("bad-truncated", "corrupt or truncated image"), ("bad-bomb", "image too large")):
        row = rows[sid]
        assert row["status"] == "failed" and needle in row["error"] and "\n" not in row["error"]
        assert row["error"].startswith(str(loaded.root / "set" / "images"))  # names the real file, not a scratch copy
        assert any(f["kind"] == "failed" for f in row["flags"])
    for sid in ("bad-cmyk", "bad-grey16", "bad-palette"):
        assert rows[sid]["status"] == "ok" and rows[sid]["answer"], sid
    summary = parse((outcome.out / "summary.html").read_text(encoding="utf-8"))
    failed_text = " ".join(summary.text)
    assert "corrupt or truncated image" in failed_text and "image too large" in failed_text


def test_summary_counts_match_the_records(hostile_run):
    _, outcome = hostile_run
    data = json.loads((outcome.out / "audit.json").read_text(encoding="utf-8"))
    records = [json.loads(p.read_text()) for p in sorted((outcome.out / "samples").glob("*/record.json"))]
    ok = [r for r in records if r["status"] == "ok"]
    graded = [r for r in ok if r["correct"] is not None]
    assert data["counts"]["correct"] == sum(r["correct"] for r in graded)
    assert data["accuracy"] == pytest.approx(sum(r["correct"] for r in graded) / len(graded))
    assert sum(data["reliance"]["histogram"]["counts"]) == len(ok)
    assert data["checks"]["pope"]["asked"] == sum("skipped" not in r["checks"]["pope"] for r in ok)
    assert data["checks"]["pope"]["hallucinations"] == sum(bool(r["checks"]["pope"].get("hallucination")) for r in ok)
    occl = [r["faithfulness"]["perturbation.occlusion"]["deletion_area"] for r in ok]
    assert data["faithfulness"]["perturbation.occlusion"]["deletion_area"] == pytest.approx(np.mean(occl))
    assert data["counts"]["flagged"] == sum(bool(r["flags"]) for r in records)


def test_hostile_strings_are_text_everywhere(hostile_run):
    _, outcome = hostile_run
    data = json.loads((outcome.out / "audit.json").read_text(encoding="utf-8"))
    row = next(r for r in data["samples"] if r["id"].startswith("<script>"))
    assert row["status"] == "ok" and row["question"].startswith(HOSTILE)
    shown = HOSTILE.replace("\x1b", "\\x1b").replace("\x07", "\\x07")  # control characters shown as escapes

    # the summary page: text, not markup; its embedded JSON parses back to audit.json
    html = (outcome.out / "summary.html").read_text(encoding="utf-8")
    tree = parse(html)
    assert_inert(tree)
    text = "".join(tree.text)
    assert shown + " id" in text and shown in text and "\x1b" not in text
    assert "<u>x&amp;\"q'\\x1b.png" in text  # the file name, as text
    scripts = [(attrs, body) for attrs, body in tree.scripts]
    assert [a.get("type") for a, _ in scripts] == ["application/json"]
    assert json.loads(scripts[0][1]) == data
    flagged = [a["href"] for t, a in tree.tags if t == "a" and a.get("href", "").endswith("report.html")]
    assert f"samples/{row['key']}/run/report.html" in flagged

    # the sample's own report (the project's renderer): same structure as a benign sample's
    report = parse((outcome.out / row["report"]).read_text(encoding="utf-8"))
    benign_row = next(r for r in data["samples"] if r["status"] == "ok" and r is not row)
    benign = parse((outcome.out / benign_row["report"]).read_text(encoding="utf-8"))
    assert_inert(report)
    assert "<script>alert(1)</script>" in "".join(report.text)
    assert len(report.scripts) == len(benign.scripts)
    assert [t for t, _ in report.tags].count("img") == [t for t, _ in benign.tags].count("img")
    for attrs, body in report.scripts:
        if attrs.get("type") == "application/json":
            json.loads(body)

    # the site page (Markdown rendered as MkDocs would) and the site's copy of the summary
    site_md = (outcome.out / "site" / "index.md").read_text(encoding="utf-8")
    assert "<script" not in site_md and "<img" not in site_md and "\x1b" not in site_md
    markdown = pytest.importorskip("markdown")
    page = parse(markdown.markdown(site_md, extensions=["tables", "attr_list", "md_in_html"]))
    assert_inert(page)
    assert not page.scripts and "<script>alert(1)</script>" in "".join(page.text)
    site_summary = parse((outcome.out / "site" / "summary.html").read_text(encoding="utf-8"))
    assert_inert(site_summary)
    links = [a["href"] for t, a in site_summary.tags if t == "a"]
    assert links and all(h.startswith("reports/") and (outcome.out / "site" / h).is_file() for h in links)


def test_rerun_reuses_everything_and_retry_failed_recomputes_failures(bad_images_run):
    loaded, outcome = bad_images_run
    before = {p: p.read_bytes() for p in (outcome.out / "samples").rglob("*") if p.is_file()}
    again = run_audit(loaded, progress=False)
    assert (again.computed, again.reused) == (0, outcome.total)
    after = {p: p.read_bytes() for p in (outcome.out / "samples").rglob("*") if p.is_file()}
    assert after == before
    retried = run_audit(loaded, retry_failed=True, progress=False)
    assert (retried.computed, retried.failed) == (2, 2)


def test_fail_fast_stops_at_the_first_failure(tmp_path, model):
    write_set(tmp_path / "set", 0, bad_images=True)
    cfg = write_config(tmp_path / "c.yaml", model, checks=[], faithfulness={"enabled": False})
    with pytest.raises(XmllmError, match=r"bad-truncated.*--fail-fast"):
        run_audit(load_config(cfg), fail_fast=True, progress=False)
    records = list((tmp_path / "out" / "samples").glob("*/record.json"))
    assert len(records) == 1 and json.loads(records[0].read_text())["status"] == "failed"


def test_two_runs_are_identical_but_for_the_timestamp(hostile_run, tmp_path):
    loaded, first = hostile_run
    second = run_audit(loaded, tmp_path / "second", progress=False)
    assert second.computed == first.total
    compare_outputs(first.out, second.out)


def test_site_build_includes_the_audit(hostile_run, tmp_path):
    """``xmllm build --quick --audit OUT``: the audit's pages, summary and reports join the site,
    under an Audits section of the nav."""
    from xmllm.build import BuildOptions, build_site

    _, outcome = hostile_run
    summary = build_site(BuildOptions(out=tmp_path / "public", quick=True, progress=False, cache=tmp_path / "cache",
                                      audits=[outcome.out, outcome.out]))
    assert summary.out == (tmp_path / "public").resolve()
    pages = sorted((tmp_path / "public" / "generated" / "audits").glob("*/index.html"))
    assert len(pages) == 2  # the same audit twice gets two slugs
    html = pages[0].read_text(encoding="utf-8")
    tree = parse(html)
    assert_inert(tree)
    assert "<script>alert(1)</script>" in "".join(tree.text)
    assert (pages[0].parent / "summary.html").is_file()
    copied = list((pages[0].parent / "reports").glob("*.html"))
    assert copied and any(t == "a" and a.get("href", "").startswith("reports/") for t, a in tree.tags)
    index = (tmp_path / "public" / "generated" / "audits" / "index.html").read_text(encoding="utf-8")
    assert "Audits" in index
    with pytest.raises(XmllmError, match="not a finished audit"):
        build_site(BuildOptions(out=tmp_path / "public", quick=True, cache=tmp_path / "cache", progress=False,
                                audits=[tmp_path]))


def test_output_folder_of_something_else_is_refused(tmp_path, model):
    write_set(tmp_path / "set", 1)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep")
    with pytest.raises(XmllmError, match="not an xmllm audit"):
        run_audit(load_config(write_config(tmp_path / "c.yaml", model)), progress=False)
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep"
    shutil.rmtree(tmp_path / "out")


def test_explainers_that_cannot_run_are_skipped_and_listed_in_the_summary(tmp_path, model):
    """An explainer whose inputs a sample lacks (here training.compare: a model folder has no
    known earlier checkpoint) is skipped with its reason on every sample; the others run, and the
    summary lists it. The token limit reaches the answers."""
    write_set(tmp_path / "set", 2)
    cfg = write_config(tmp_path / "audit.yaml", model, checks=[], max_new_tokens=3,
                       explainers={"perturbation.occlusion": {"window": 2}, "training.compare": {}})
    outcome = run_audit(load_config(cfg), progress=False)
    assert outcome.failed == 0 and outcome.computed == 2
    data = json.loads((outcome.out / "audit.json").read_text(encoding="utf-8"))
    skipped = data["skipped_explainers"]["training.compare"]
    assert skipped["samples"] == 2 and "needs a second checkpoint" in skipped["reason"]
    summary = parse((outcome.out / "summary.html").read_text(encoding="utf-8"))
    assert "training.compare" in "".join(summary.text) and "needs a second checkpoint" in "".join(summary.text)
    for run_dir in (outcome.out / "samples").glob("*/run"):
        manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
        assert manifest["explainers"] == ["perturbation.occlusion", "inference.visual_reliance"]
        assert "needs a second checkpoint" in manifest["skipped"]["training.compare"]
        assert manifest["answer"]["max_new_tokens"] == 3
    assert load_config(cfg).config.max_new_tokens == 3
    with pytest.raises(ConfigError, match="max_new_tokens"):
        load_config(write_config(tmp_path / "bad.yaml", model, max_new_tokens=0))
