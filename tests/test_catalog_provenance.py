"""Where the catalog's claims about the survey come from: every confirmed citation records the page,
section or figure of the survey that names it (a confirmation without one is refused by the real
loader and by ``xmllm catalog --check``), runnable references the survey is not known to cite stay
out of the cited methods, and the taxonomy pages say which figure the tree is."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import markdown
import pytest

from catalog_checks import CATALOG_HEAD, check_fails, line_of
from xmllm.catalog import DEFAULT_PATH, CatalogError, load_catalog
from xmllm.catalog.schema import SOURCE_RE
from xmllm.cli import main
from xmllm.site import explainers as explainer_pages
from xmllm.site import taxonomy

ROOT = Path(__file__).resolve().parents[1]
RUNNABLE_ONLY = {"POPE": "2305.10355", "CHAIR": "1809.02156"}
"""Runnable references the survey is not known to cite."""

# One leaf with one confirmed citation; {source} is replaced per case (a whole ``source:`` entry or nothing).
TEMPLATE = CATALOG_HEAD + """\
    leaves:
      - id: data.benchmark
        name: Benchmark
        description: Test sets.
        survey_refs: [99, 107]
        methods:
          - {{name: "Some <Bench>", year: 2024, arxiv: "2410.04609", confidence: confirmed{source}}}
          - {{name: Other, year: 2023, arxiv: "2312.02896", confidence: candidate}}
        runnable_refs:
          - {{name: POPE, year: 2023, arxiv: "2305.10355"}}
        explainers: [benchmark.pope]
"""


@pytest.fixture(scope="module")
def cat():
    return load_catalog()


def _check(tmp_path: Path, capsys, text: str) -> str:
    """As :func:`check_fails`, and the line names the file with a line number (``FILE:LINE: ...``)."""
    line = check_fails(tmp_path, capsys, text)
    assert line.startswith(f"{tmp_path / 'bad.yaml'}:")
    return line


# --- the packaged catalog ---------------------------------------------------------------


def test_every_confirmed_citation_records_where_the_survey_names_it(cat) -> None:
    confirmed = [(leaf.id, m) for leaf in cat.leaves() for m in leaf.methods if m.confidence == "confirmed"]
    assert {(lid, m.name) for lid, m in confirmed} == {
        ("data.benchmark", n) for n in ("VISTA", "BenchLMM", "MultiTrust", "MUB")}
    for lid, m in confirmed:
        assert m.source and SOURCE_RE.search(m.source), (lid, m.name, m.source)
        assert "Benchmark" in m.source, (lid, m.name, m.source)  # the leaf's own part of the survey


def test_runnable_references_are_not_cited_methods(cat) -> None:
    for leaf in cat.leaves():
        for m in leaf.methods:
            assert m.name not in RUNNABLE_ONLY and m.arxiv not in RUNNABLE_ONLY.values(), (leaf.id, m.name)
    bench = next(leaf for leaf in cat.leaves() if leaf.id == "data.benchmark")
    assert {r.name: r.arxiv for r in bench.runnable_refs} == RUNNABLE_ONLY
    assert "POPE" in bench.runnable_as and "CHAIR" in bench.runnable_as
    assert "benchmark.pope" in bench.explainers


def test_leaves_and_reference_numbers_are_from_figure_2(cat) -> None:
    assert cat.survey.taxonomy_figure == "Figure 2"
    refs = {leaf.id: leaf.survey_refs for leaf in cat.leaves()}
    assert len(refs) == 16
    # spot checks against the figure's boxes (the whole tree is pinned in test_catalog.py)
    assert refs["data.input-output"] == [102, 103, 104, 105, 106]
    assert refs["model.embedding.cross-modal"] == [132, *range(146, 156)]
    assert refs["training-inference.training"] == [133, 141, 142, 161, *range(180, 190)]


# --- the pages --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pages():
    out = taxonomy.generate({}, explainer_pages.titles())
    out.extend(explainer_pages.generate({}))
    return {p.path: p.content for p in out.pages}


def _html(pages: dict, path: str) -> str:
    return markdown.markdown(pages[path], extensions=["tables"])


def test_taxonomy_page_names_figure_2_as_the_source_of_the_tree(pages, cat) -> None:
    html = _html(pages, taxonomy.TAXONOMY_INDEX)
    assert "<strong>Source of the tree:</strong> the survey's Figure 2." in html
    assert "the 16 leaves and each leaf's survey reference numbers match Figure 2, box for box" in html
    leaf = _html(pages, taxonomy.leaf_page("model.layer.workflow"))
    assert "as printed in this leaf's box of the survey's Figure 2" in leaf


def test_benchmark_page_shows_sources_and_keeps_pope_and_chair_apart(pages) -> None:
    html = _html(pages, taxonomy.leaf_page("data.benchmark"))
    cited, _, rest = html.partition("<h2>Methods the survey cites</h2>")[2].partition("<h2>")
    assert cited and rest
    for name in ("VISTA", "BenchLMM", "MultiTrust", "MUB"):
        row = next(r for r in cited.split("<tr>") if f"<td>{name}</td>" in r)
        assert "<td>confirmed</td>" in row and "Benchmark section of perspective (I) Data" in row
    for name, arxiv in RUNNABLE_ONLY.items():
        assert name not in cited and arxiv not in cited
    before = html.partition("<h2>Methods the survey cites</h2>")[0]
    runnable = next(p for p in before.split("<p>") if p.startswith("<strong>Runnable-as references:</strong>"))
    for name, arxiv in RUNNABLE_ONLY.items():
        assert name in runnable and f"https://arxiv.org/abs/{arxiv}" in runnable
    assert "The survey is not known to cite these" in runnable
    # and POPE is still cited where it is run: on its explainer's page
    assert "https://arxiv.org/abs/2305.10355" in _html(pages, explainer_pages.explainer_page("benchmark.pope"))


# --- broken provenance, through the real loader and the CLI -----------------------------


def test_a_source_passes(tmp_path, capsys) -> None:
    f = tmp_path / "ok.yaml"
    f.write_text(TEMPLATE.format(source=', source: "Figure 2, p. 5"'))
    assert main(["catalog", "--check", str(f)]) == 0
    assert capsys.readouterr().out.strip() == f"{f}: ok (1 leaves, 1 explainer ids)"
    assert load_catalog(f).leaves()[0].methods[0].source == "Figure 2, p. 5"


def test_a_confirmed_citation_without_a_source_is_refused_naming_the_method(tmp_path, capsys) -> None:
    text = TEMPLATE.format(source="")
    msg = _check(tmp_path, capsys, text)
    assert msg.startswith(f"{tmp_path / 'bad.yaml'}:{line_of(text, 'confirmed')}: perspectives[0].leaves[0].methods[0]: ")
    assert "method 'Some <Bench>' is marked confirmed but records no source" in msg
    # the loader itself raises the same one-line error
    with pytest.raises(CatalogError, match="'Some <Bench>' is marked confirmed but records no source"):
        load_catalog(tmp_path / "bad.yaml")


def test_the_installed_command_refuses_it_too(tmp_path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(TEMPLATE.format(source=""))
    proc = subprocess.run([sys.executable, "-m", "xmllm.cli", "catalog", "--check", str(f)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [proc.stderr.strip()]
    assert "'Some <Bench>' is marked confirmed but records no source" in proc.stderr


@pytest.mark.parametrize("source", ["", "the survey", "somewhere in the text"])
def test_a_source_that_names_no_page_section_or_figure_is_refused(tmp_path, capsys, source) -> None:
    text = TEMPLATE.format(source=f", source: {source!r}")
    msg = _check(tmp_path, capsys, text)
    assert ".methods[0].source: " in msg
    assert ("at least 1 character" in msg) if not source else (
        f"source {source!r} must say where in the survey: a page, section or figure" in msg)


def test_a_runnable_reference_cannot_also_be_a_cited_method(tmp_path, capsys) -> None:
    text = TEMPLATE.format(source=', source: "section 3"').replace(
        '{name: Other, year: 2023, arxiv: "2312.02896", confidence: candidate}',
        '{name: POPE, year: 2023, arxiv: "2305.10355", confidence: candidate}')
    msg = _check(tmp_path, capsys, text)
    assert "perspectives[0].leaves[0]: " in msg
    assert "'POPE' is listed both as a cited method and in runnable_refs" in msg


def test_the_packaged_file_checks_clean(capsys) -> None:
    assert main(["catalog", "--check", str(DEFAULT_PATH)]) == 0
    assert ": ok (16 leaves," in capsys.readouterr().out
