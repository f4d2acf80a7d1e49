"""``xmllm evaluate`` end to end on a random-weight demo-architecture model: the printed JSON, the
saved result, the table, the site page and its plots, reproducibility, and one-line errors."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


from random_demo import save_random_demo

from xmllm.cli import main
from xmllm.evaluation import read_result, trust_page_markdown, write_trust_page

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

METRICS = ["pointing_game", "relevance_mass", "relevance_rank", "deletion_area", "insertion_area"]
EXPLAINERS = ["gradient.saliency", "perturbation.occlusion"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_random_demo(tmp_path_factory.mktemp("demo") / "model")


def _strict_json(text: str):
    def no_constants(name: str):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=no_constants)


@pytest.fixture(scope="module")
def run(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "out"
    argv = ["evaluate", "--model", str(model_dir), "--demo", "6", "--explainers", ",".join(EXPLAINERS),
            "--sanity-samples", "1", "--out", str(out), "--json"]
    return out, argv


@pytest.fixture(scope="module")
def result(run):
    out, argv = run
    capture = pytest.MonkeyPatch()
    import io

    buffer = io.StringIO()
    capture.setattr(sys, "stdout", buffer)
    try:
        assert main(argv) == 0
    finally:
        capture.undo()
    return _strict_json(buffer.getvalue()), out


def test_json_has_a_table_per_explainer_with_intervals_and_the_random_floor(result) -> None:
    printed, out = result
    assert printed["config"]["explainers"] == EXPLAINERS
    assert [m["name"] for m in printed["metrics"]] == METRICS
    saved = _strict_json((out / "evaluation.json").read_text())
    assert len(saved["per_sample"]) == 6 and saved["samples"]["with_truth"] == 6
    for eid in [*EXPLAINERS, "random"]:
        for metric in METRICS:
            entry = printed["table"][eid][metric]
            assert entry["n"] == 6
            assert entry["low"] <= entry["mean"] <= entry["high"]
            values = [r["scores"][eid][metric] for r in saved["per_sample"]]
            assert entry["mean"] == pytest.approx(np.mean(values))
    for eid in EXPLAINERS:
        assert all(f["kind"] in ("unfaithful", "sanity") for f in printed["flags"][eid])
        floor, mine = printed["table"]["random"]["deletion_area"], printed["table"][eid]["deletion_area"]
        beats = mine["high"] < floor["low"]
        assert beats == (not any(f["kind"] == "unfaithful" for f in printed["flags"][eid]))
        curves = printed["curves"][eid]
        assert len(curves["deletion"]) == len(printed["config"]["fractions"]) == printed["config"]["steps"] + 1
    assert printed["curves"]["random"]["deletion"][0] == printed["curves"]["gradient.saliency"]["deletion"][0]
    sanity = printed["sanity"]
    assert sanity["samples"] == 1 and len(sanity["stages"]) == 5
    assert set(sanity["explainers"]) == set(EXPLAINERS)
    assert printed["verdict"]["pointing_bar"] == 0.9
    assert set(printed["verdict"]["trusted"]) | set(printed["verdict"]["flagged"]) == set(EXPLAINERS)
    assert printed["timings"]["per_sample"]["wall_seconds"] > 0
    assert "per_sample" not in printed


def test_table_page_and_plots_are_written(result, tmp_path) -> None:
    printed, out = result
    table = (out / "table.txt").read_text()
    for label in [*EXPLAINERS, "random (floor)", "pointing game ↑", "deletion area ↓"]:
        assert label in table
    page = (out / "trust.md").read_text()
    assert page.startswith("# Which explainer to trust")
    for eid in EXPLAINERS:
        assert f"| {eid} |" in page
    for png in ("trust-curves.png", "trust-metrics.png", "trust-sanity.png"):
        assert f"]({png})" in page
        with Image.open(out / png) as image:
            assert image.format == "PNG" and image.width > 300
    # the site builder's entry point: site/generated/trust.md with its plots beside it
    written = write_trust_page(out / "evaluation.json", tmp_path / "site")
    assert written == tmp_path / "site" / "generated" / "trust.md"
    assert written.read_text() == page
    assert (written.parent / "trust-curves.png").is_file()
    assert write_trust_page(out / "evaluation.json", tmp_path / "site" / "generated") == written


def test_markdown_page_holds_the_table_verdict_and_sanity_of_the_json(result) -> None:
    """The written trust.md, parsed back as Markdown tables, shows the JSON's numbers row by row."""
    _, out = result
    saved = read_result(out / "evaluation.json")
    page = (out / "trust.md").read_text(encoding="utf-8")
    tables = _markdown_tables(page)
    scores = tables[0]
    titles = [m["title"] for m in saved["metrics"]]
    assert scores["head"] == ["Explainer", *(f"{t} {'↑' if m['higher_is_better'] else '↓'}"
                                            for t, m in zip(titles, saved["metrics"])), "Sanity ρ", "Verdict"]
    assert [r[0] for r in scores["rows"]] == [*EXPLAINERS, "*random (floor)*"]
    for row in scores["rows"]:
        eid = "random" if row[0].startswith("*") else row[0]
        for metric, shown in zip(saved["metrics"], row[1:]):
            entry = saved["table"][eid][metric["name"]]
            assert shown == f"{entry['mean']:.3f} [{entry['low']:.3f}, {entry['high']:.3f}]", (eid, metric["name"])
        if eid != "random":
            flagged = bool(saved["flags"][eid])
            assert row[-1].startswith("⚠") == flagged and (row[-1] == "✓ trusted") == (not flagged)
            assert row[-2] == f"{saved['sanity']['explainers'][eid]['final']:.2f}"
    sanity = tables[1]
    assert sanity["head"] == ["Explainer", *saved["sanity"]["stages"], "Survives"]
    for row in sanity["rows"]:
        check = saved["sanity"]["explainers"][row[0]]
        assert row[1:-1] == [f"{s['mean']:.2f}" for s in check["stages"]]
    for eid in saved["verdict"]["flagged"]:
        assert f"**Do not trust {eid}**" in page.replace("\\", "")
    verdict = saved["verdict"]
    # "best" follows the verdict's rule: a flagged explainer is never the best, and the page says so
    assert verdict["best_pointing"] is None or verdict["best_pointing"] in verdict["trusted"]
    if verdict["best_pointing"]:
        assert f"{verdict['best_pointing_game']:.3f}" in page
    else:
        assert "No trusted explainer has a pointing game" in page
    if verdict["best_flagged"]:
        assert verdict["best_flagged"] in verdict["flagged"] and "is flagged above" in page
    # six samples: every verdict is provisional, and the page says so at the top of the verdict
    assert verdict["provisional"] and verdict["grounded_samples"] < verdict["min_samples"]
    assert page.index("Provisional") < page.index("## Scores")


def _markdown_tables(page: str) -> list[dict]:
    """Every pipe table of a Markdown page: its header cells and its rows' cells (unescaped)."""
    tables, lines = [], page.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|---|") and i > 0:
            cells = lambda text: [c.strip().replace("\\", "") for c in text.strip().strip("|").split("|")]
            rows = []
            for follow in lines[i + 1:]:
                if not follow.startswith("|"):
                    break
                rows.append(cells(follow))
            tables.append({"head": cells(lines[i - 1]), "rows": rows})
    return tables


def test_site_build_includes_the_trust_page(result, tmp_path) -> None:
    """A real (quick) MkDocs build given the evaluation: the page, its plots and its nav entry."""
    from xmllm.build import BuildOptions, build_site

    _, out = result
    summary = build_site(BuildOptions(out=tmp_path / "public", quick=True, progress=False,
                                      cache=tmp_path / "cache", evaluation=out / "evaluation.json"))
    assert not summary.model_loaded
    built = tmp_path / "public" / "generated" / "trust.html"
    text = built.read_text(encoding="utf-8")
    assert "Which explainer to trust" in text
    for eid in EXPLAINERS:
        assert f"<td>{eid}</td>" in text
    for png in ("trust-curves.png", "trust-metrics.png", "trust-sanity.png"):
        assert f'src="{png}"' in text
        assert (built.parent / png).read_bytes() == (out / png).read_bytes()
    index = (tmp_path / "public" / "index.html").read_text(encoding="utf-8")
    assert 'href="generated/trust.html"' in index  # the nav slot shows once the page exists
    quick = tmp_path / "public-quick"
    build_site(BuildOptions(out=quick, quick=True, progress=False, cache=tmp_path / "cache"))
    assert not (quick / "generated" / "trust.html").exists()
    assert 'href="generated/trust.html"' not in (quick / "index.html").read_text(encoding="utf-8")


def test_same_seed_same_numbers_whatever_else_runs(result, model_dir, tmp_path, capsys) -> None:
    printed, _ = result
    argv = ["evaluate", "--model", str(model_dir), "--demo", "6", "--explainers", "gradient.saliency",
            "--sanity-samples", "0", "--out", str(tmp_path / "again"), "--json"]
    assert main(argv) == 0
    again = _strict_json(capsys.readouterr().out)
    assert again["table"]["gradient.saliency"] == printed["table"]["gradient.saliency"]
    assert again["table"]["random"] == printed["table"]["random"]
    assert again["sanity"] is None


def test_sample_set_from_jsonl(model_dir, tmp_path, capsys) -> None:
    from xmllm.explainers.demo.samples import generate_samples, write_sample_set

    path = write_sample_set(generate_samples(3, 5), tmp_path / "set", progress=False)
    argv = ["evaluate", "--model", str(model_dir), "--samples", str(path), "--explainers", "gradient.saliency",
            "--sanity-samples", "0", "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "gradient.saliency" in printed and "random (floor)" in printed
    saved = read_result(tmp_path / "out" / "evaluation.json")
    assert saved["samples"]["source"] == "jsonl" and saved["samples"]["n"] == 3


@pytest.mark.parametrize("extra, message", [
    (["--demo", "0"], "--demo must be a positive number"),
    (["--demo", "2", "--explainers", "attention.summary"], "gives no image map"),
    (["--demo", "2", "--explainers", "no.such"], "unknown explainer id"),
    (["--demo", "2", "--baseline", "pink"], "--baseline 'pink'"),
    (["--samples", "missing.jsonl"], "sample set not found"),
    (["--demo", "2", "--explainers", "gradient.saliency", "--param", "gradient.saliency.pool=odd"], "pool='odd'"),
])
def test_bad_input_is_one_line_and_writes_nothing(model_dir, tmp_path, capsys, extra, message) -> None:
    out = tmp_path / "out"
    assert main(["evaluate", "--model", str(model_dir), *extra, "--sanity-samples", "0", "--out", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("xmllm")]
    assert len(err) == 1 and err[0].startswith("xmllm: error: ") and message in err[0], err
    assert not (out / "evaluation.json").exists()


def test_page_escapes_what_came_from_outside(result) -> None:
    printed, out = result
    saved = read_result(out / "evaluation.json")
    saved["model"]["spec"] = "<script>alert(1)</script>|`x`"
    page = trust_page_markdown(saved)
    import markdown

    rendered = markdown.markdown(page, extensions=["tables"])
    assert "<script>" not in rendered and "&lt;script&gt;" in rendered
    assert "<code>xmllm evaluate --model &lt;script&gt;alert(1)&lt;/script&gt;|x --demo 6 --seed 0</code>" in rendered
    assert rendered.count("<table>") == page.count("\n|---|")  # the pipe started no table of its own
    with pytest.raises(Exception, match="missing field"):
        trust_page_markdown({"format": 1})


def test_pointing_game_by_question_type(result) -> None:
    """Each sample's question type is recorded, the pointing game is summarised per question type
    and the page shows it; an evaluation.json of xmllm 0.2 (key ``families``) shows the same table."""
    _, out = result
    saved = read_result(out / "evaluation.json")
    assert all(r["question_type"] in ("colour", "shape", "count", "presence", "position") for r in saved["per_sample"])
    by_type = saved["question_types"]
    assert set(by_type) == {*EXPLAINERS, "random"} and by_type["random"]
    page = trust_page_markdown(saved)
    table = _markdown_tables(page[page.index("## Pointing game by question type"):])[0]
    assert table["head"] == ["Explainer", *sorted({t for per in by_type.values() for t in per})]
    old = {("families" if k == "question_types" else k): v for k, v in saved.items()}
    assert trust_page_markdown(old) == page


def test_explainers_with_a_target_parameter_are_scored_once_per_target(model_dir) -> None:
    """relevancy.chefer runs with both targets (log-prob and logit), so that the evaluation measures
    which to default to; a target the user fixes runs alone."""
    import xmllm

    both = xmllm.evaluate(str(model_dir), demo=3, explainers=["relevancy.chefer"], sanity_samples=1, device="cpu")
    labels = ["relevancy.chefer[target=logit]", "relevancy.chefer[target=logprob]"]
    assert both["config"]["explainers"] == labels
    assert [both["config"]["params"][label]["target"] for label in labels] == ["logit", "logprob"]
    assert set(both["sanity"]["explainers"]) == set(labels) and set(labels) <= set(both["table"])
    one = xmllm.evaluate(str(model_dir), demo=3, explainers=["relevancy.chefer"], sanity_samples=0, device="cpu",
                         params={"relevancy.chefer": {"target": "logit"}})
    assert one["config"]["explainers"] == ["relevancy.chefer"]
    logit_rows = [r["scores"]["relevancy.chefer[target=logit]"] for r in both["per_sample"]]
    assert [r["scores"]["relevancy.chefer"] for r in one["per_sample"]] == logit_rows
