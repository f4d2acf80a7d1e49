"""The packaged catalog encodes the survey's tree, and broken catalogs fail in one line."""
from __future__ import annotations

import json
import re

import pytest
import yaml

from catalog_checks import CATALOG_HEAD, check_fails, line_of
from xmllm.catalog import DEFAULT_PATH, CatalogError, load_catalog
from xmllm.cli import main
from xmllm import XmllmError

LEAF_IDS = [
    "data.input-output",
    "data.benchmark",
    "data.application",
    "model.token.visual",
    "model.token.visual-text",
    "model.embedding.visual",
    "model.embedding.textual",
    "model.embedding.cross-modal",
    "model.neuron.individual",
    "model.neuron.specialization",
    "model.layer.components",
    "model.layer.workflow",
    "model.architecture.analysis",
    "model.architecture.design",
    "training-inference.training",
    "training-inference.inference",
]

# A minimal valid catalog; each invalid case below changes one thing in it.
MINIMAL = CATALOG_HEAD + """\
    leaves:
      - id: data.input-output
        name: Input & Output
        description: Ties outputs to inputs.
        survey_refs: [102, 103]
        methods:
          - {name: X, year: 2024, arxiv: "2401.06209", confidence: candidate}
        explainers: [perturbation.occlusion]
"""


# --- the packaged catalog ---------------------------------------------------------------


@pytest.fixture(scope="module")
def cat():
    return load_catalog()


def test_packaged_catalog_validates_and_has_the_survey(cat) -> None:
    assert DEFAULT_PATH.name == "taxonomy.yaml" and DEFAULT_PATH.parent.name == "catalog"
    assert cat.survey.arxiv == "2412.02104"
    assert cat.survey.year == 2024
    assert cat.survey.authors == "Dang, Huang et al."
    assert cat.terms.interpretability and cat.terms.explainability


def test_three_perspectives_and_model_groups(cat) -> None:
    assert [p.id for p in cat.perspectives] == ["data", "model", "training-inference"]
    model = cat.perspectives[1]
    assert [g.id for g in model.children] == [
        "model.token", "model.embedding", "model.neuron", "model.layer", "model.architecture"
    ]


def test_exactly_the_sixteen_leaves(cat) -> None:
    assert [leaf.id for leaf in cat.leaves()] == LEAF_IDS


def test_every_leaf_has_explainers_and_every_registered_explainer_has_a_leaf(cat) -> None:
    from xmllm.explainers.registry import registered

    used: set[str] = set()
    for leaf in cat.leaves():
        assert leaf.explainers, leaf.id
        assert set(leaf.explainers) <= set(registered()), leaf.id
        assert leaf.survey_refs and all(r > 0 for r in leaf.survey_refs)
        assert 2 <= len(re.findall(r"[.!?](?:\s|$)", leaf.description)) <= 4, leaf.id
        used |= set(leaf.explainers)
    assert used == set(registered())


def test_survey_refs_ranges_are_expanded(cat) -> None:
    refs = {leaf.id: leaf.survey_refs for leaf in cat.leaves()}
    assert refs["data.benchmark"] == [99, *range(107, 118)]
    assert refs["model.layer.workflow"] == [134, 158, 159, 163, 164, 165]
    assert refs["training-inference.inference"] == [103, 142, *range(190, 195)]


def test_only_benchmarks_named_by_the_survey_are_confirmed(cat) -> None:
    confirmed = {(leaf.id, m.name) for leaf in cat.leaves() for m in leaf.methods if m.confidence == "confirmed"}
    assert confirmed == {("data.benchmark", n) for n in ("VISTA", "BenchLMM", "MultiTrust", "MUB")}


def test_default_path_loads_from_any_working_directory(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert len(load_catalog().leaves()) == 16


# --- the command line -------------------------------------------------------------------


def test_cli_json_view(capsys) -> None:
    assert main(["catalog", "--json"]) == 0
    view = json.loads(capsys.readouterr().out)
    assert [row["id"] for row in view["leaves"]] == LEAF_IDS
    assert view["survey"]["arxiv"] == "2412.02104"
    assert len(view["perspectives"]) == 3
    visual = view["leaves"][3]
    assert visual["path"] == ["Model", "Token", "Visual Token"]
    assert view["leaves"][0]["path"] == ["Data", "Input & Output"]
    for row in view["leaves"]:
        assert row["explainers"]
        assert {e["status"] for e in row["explainers"]} == {"implemented"}
    from xmllm.explainers.registry import registered

    cov = view["coverage"]
    assert cov["leaves_total"] == 16 and cov["explainers_total"] == len(registered())
    assert cov["leaves_covered"] == 16 and cov["explainer_ids_used"] == len(registered())


def test_cli_tree(capsys) -> None:
    assert main(["catalog"]) == 0
    out = capsys.readouterr().out
    for name in ("Data", "Model", "Training & Inference", "Token", "Visual-Text Token", "Inference"):
        assert name in out
    assert len(re.findall(r"\[\d+/\d+ implemented\]", out)) == 16
    from xmllm.explainers.registry import registered

    n = len(registered())
    assert f"Leaves covered: 16/16 · explainers implemented: {n}/{n}" in out


def test_cli_check_ok(tmp_path, capsys) -> None:
    f = tmp_path / "mini.yaml"
    f.write_text(MINIMAL)
    assert main(["catalog", "--check", str(f)]) == 0
    assert capsys.readouterr().out.strip() == f"{f}: ok (1 leaves, 1 explainer ids)"
    assert main(["catalog", "--check", str(DEFAULT_PATH)]) == 0
    from xmllm.explainers.registry import registered

    assert capsys.readouterr().out.strip() == f"{DEFAULT_PATH}: ok (16 leaves, {len(registered())} explainer ids)"


# --- invalid catalogs -------------------------------------------------------------------


def test_unknown_key(tmp_path, capsys) -> None:
    text = MINIMAL.replace("        name: Input & Output\n", "        name: Input & Output\n        colour: red\n")
    msg = check_fails(tmp_path, capsys, text)
    assert msg == f"{tmp_path / 'bad.yaml'}:{line_of(text, 'colour')}: perspectives[0].leaves[0].colour: unknown key 'colour'"


def test_wrong_type(tmp_path, capsys) -> None:
    text = MINIMAL.replace("  year: 2024", '  year: "2024"')
    msg = check_fails(tmp_path, capsys, text)
    assert msg.startswith(f"{tmp_path / 'bad.yaml'}:4: survey.year: ")
    assert "integer" in msg


def test_missing_required_field(tmp_path, capsys) -> None:
    text = MINIMAL.replace("        description: Ties outputs to inputs.\n", "")
    msg = check_fails(tmp_path, capsys, text)
    assert msg == f"{tmp_path / 'bad.yaml'}:{line_of(text, '- id: data.input-output')}: perspectives[0].leaves[0].description: missing required key"


def test_duplicate_id(tmp_path, capsys) -> None:
    leaf = MINIMAL[MINIMAL.index("      - id: data.input-output"):]
    text = MINIMAL + leaf
    msg = check_fails(tmp_path, capsys, text)
    second = [i for i, line in enumerate(text.splitlines(), 1) if "- id: data.input-output" in line][1]
    assert msg.startswith(f"{tmp_path / 'bad.yaml'}:{second}: perspectives[0].leaves[1].id: duplicate id 'data.input-output'")


def test_duplicate_key(tmp_path, capsys) -> None:
    text = MINIMAL.replace("  year: 2024\n", "  year: 2024\n  year: 2025\n")
    assert check_fails(tmp_path, capsys, text) == f"{tmp_path / 'bad.yaml'}:5: survey.year: duplicate key 'year'"


def test_unknown_explainer_id(tmp_path, capsys) -> None:
    text = MINIMAL.replace("[perturbation.occlusion]", "[perturbation.occlusion, foo.bar]")
    msg = check_fails(tmp_path, capsys, text)
    assert msg.startswith(
        f"{tmp_path / 'bad.yaml'}:{line_of(text, 'foo.bar')}: perspectives[0].leaves[0].explainers[1]: unknown explainer id 'foo.bar'"
    )


def test_empty_explainers(tmp_path, capsys) -> None:
    text = MINIMAL.replace("[perturbation.occlusion]", "[]")
    msg = check_fails(tmp_path, capsys, text)
    assert msg == f"{tmp_path / 'bad.yaml'}:{line_of(text, 'explainers')}: perspectives[0].leaves[0].explainers: needs at least one explainer id"


@pytest.mark.parametrize("value", ['"2401.062"', '"arXiv:2401.06209"', '"2401.062099"'])
def test_malformed_arxiv_id(tmp_path, capsys, value: str) -> None:
    text = MINIMAL.replace('"2401.06209"', value)
    msg = check_fails(tmp_path, capsys, text)
    assert msg.startswith(f"{tmp_path / 'bad.yaml'}:{line_of(text, value)}: perspectives[0].leaves[0].methods[0].arxiv: malformed arXiv id")


def test_unquoted_arxiv_id_is_reported(tmp_path, capsys) -> None:
    text = MINIMAL.replace('arxiv: "2412.02104"', "arxiv: 2412.02104")
    msg = check_fails(tmp_path, capsys, text)
    assert msg.startswith(f"{tmp_path / 'bad.yaml'}:5: survey.arxiv: arXiv id must be a quoted string")


def test_yaml_syntax_error(tmp_path, capsys) -> None:
    text = MINIMAL.replace("[102, 103]", "[102, 103")
    msg = check_fails(tmp_path, capsys, text)
    assert re.match(rf"{re.escape(str(tmp_path / 'bad.yaml'))}:\d+: YAML syntax error: ", msg)
    assert int(msg.split(":")[1]) >= line_of(text, "[102, 103")


def test_id_must_nest_under_its_parent(tmp_path, capsys) -> None:
    text = MINIMAL.replace("- id: data.input-output", "- id: model.input-output")
    msg = check_fails(tmp_path, capsys, text)
    assert msg.startswith(f"{tmp_path / 'bad.yaml'}:{line_of(text, 'model.input-output')}: perspectives[0].leaves[0].id: ")


def test_file_not_found(tmp_path, capsys) -> None:
    missing = tmp_path / "nope.yaml"
    assert main(["catalog", "--check", str(missing)]) == 2
    assert capsys.readouterr().err.strip() == f"xmllm: error: {missing}: file not found"


def test_not_a_mapping(tmp_path, capsys) -> None:
    msg = check_fails(tmp_path, capsys, "- just\n- a list\n")
    assert "expected a mapping" in msg


def test_catalog_error_is_a_one_line_xmllm_error(tmp_path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(MINIMAL.replace("name: Data", "name: [Data,\n  More]"))
    with pytest.raises(CatalogError) as info:
        load_catalog(f)
    assert isinstance(info.value, XmllmError) and isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)
    assert info.value.path == "perspectives[0].name" and info.value.line == 11


def test_minimal_catalog_round_trips(tmp_path) -> None:
    f = tmp_path / "mini.yaml"
    f.write_text(MINIMAL)
    cat = load_catalog(f)
    assert yaml.safe_load(MINIMAL)["survey"] == cat.survey.model_dump(exclude_none=True)
