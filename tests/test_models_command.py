"""``xmllm models``: every mapped model type with its adapter and the explainers' refusals, from one
source that the README's table and the tiny-model matrix cannot drift from."""
from __future__ import annotations

import json
import re
from pathlib import Path

from loaded_models import tiny_loaded
from tiny_models import ALL_FAMILIES

from xmllm.cli import main
from xmllm.explainers.models.coverage import family_status, tested_families
from xmllm.explainers.registry import get_explainer, sample_level_ids

README = Path(__file__).resolve().parents[1] / "README.md"


def _cli_json(capsys, *argv: str):
    assert main(["models", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_the_tested_record_is_the_suites_matrix():
    assert tested_families() == frozenset(ALL_FAMILIES)


def test_every_mapped_type_is_listed_with_its_adapter(capsys):
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    out = _cli_json(capsys)
    rows = {row["model_type"]: row for row in out["families"]}
    assert set(rows) == set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)
    for own in ("llava", "llava_next", "qwen2_vl", "idefics3", "paligemma", "gemma3"):
        assert rows[own]["adapter"] == "own" and rows[own]["tested"]
    for row in rows.values():
        assert row["adapter"] in ("own", "generic", "none")
        assert (row["adapter"] == "none") == bool(row["reason"])
        assert set(row["refusals"]) <= set(sample_level_ids())
    assert rows["florence2"]["adapter"] == "none" and "encoder-decoder" in rows["florence2"]["reason"]
    assert not rows["florence2"]["decoder_style"]
    # a hybrid decoder: the attention explainers declare why, the others run
    hybrid = rows["qwen3_5"]
    assert hybrid["adapter"] == "generic" and "attention.rollout" in hybrid["refusals"]
    assert "linear" in hybrid["refusals"]["attention.rollout"] and "gradient.saliency" not in hybrid["refusals"]
    cov = out["coverage"]
    assert cov["tested"] == len([r for r in rows.values() if r["tested"] and r["adapter"] != "none" and r["decoder_style"]])
    assert cov["decoder_style"] == sum(r["decoder_style"] for r in rows.values())


def test_one_type_and_an_unknown_one(capsys):
    assert main(["models", "qwen3_5"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("qwen3_5") and "attention.rollout: refuses:" in text
    assert main(["models", "not_a_type"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not_a_type" in err[0]


def test_static_refusals_are_the_ones_a_loaded_model_gives():
    """What the listing says from the default config is what the tiny model refuses when loaded."""
    for family in ALL_FAMILIES:
        loaded = tiny_loaded(family)
        live = {eid for eid in sample_level_ids() if get_explainer(eid)().unmet_by_model(loaded) is not None}
        assert live == set(family_status(family).refusals), family


def test_the_readme_table_is_the_commands(capsys):
    assert main(["models", "--markdown"]) == 0
    table = capsys.readouterr().out.strip()
    text = README.read_text(encoding="utf-8")
    match = re.search(r"<!-- models:start -->\n(.*?)\n<!-- models:end -->", text, re.S)
    assert match, "README lacks the models table markers"
    assert match.group(1).strip() == table, "README's model table is stale: paste `xmllm models --markdown`"
