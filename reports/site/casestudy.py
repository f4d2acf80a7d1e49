"""The case study page: the numbers of :mod:`xmllm.casestudy`, its plot, and the records."""
from __future__ import annotations

import json
from typing import Any

from . import markdown as md
from .pages import GENERATED, SiteOutput, relative

CASESTUDY_PAGE = f"{GENERATED}/casestudy.md"
CASESTUDY_DIR = f"{GENERATED}/casestudy"
PLOT = f"{CASESTUDY_DIR}/image-share.svg"
RESULTS = f"{CASESTUDY_DIR}/results.json"
EXAMPLE_ROWS = 12
"""Wrong answers listed on the page (all records are in results.json)."""


def _prop(p: dict[str, Any]) -> str:
    if not p["n"]:
        return "no cases"
    lo, hi = p["interval"]
    return f"{md.percent(p['rate'])} ({p['k']}/{p['n']}; 95% CI {md.interval(lo, hi, as_percent=True)})"


def _mean(m: dict[str, Any]) -> str:
    if not m["n"]:
        return "no cases"
    lo, hi = m["interval"]
    return f"{md.number(m['mean'])} (n={m['n']}; 95% CI {md.interval(lo, hi)})"


def _verdict(share: dict[str, Any]) -> str:
    diff = share["right_minus_wrong"]
    if diff["difference"] is None:
        return ("Every sample was answered right (or every one wrong), so image shares of right and wrong "
                "answers cannot be compared on this model.")
    lo, hi = diff["interval"]
    if lo > 0:
        return (f"Right answers draw **more** on the image than wrong ones: the difference of means is "
                f"{md.number(diff['difference'])} (95% CI {md.interval(lo, hi)}, permutation p = "
                f"{md.number(diff['p_value'], 4)}). This agrees with LVLM-Interpret's reading of MMVP.")
    if hi < 0:
        return (f"Right answers draw **less** on the image than wrong ones: the difference of means is "
                f"{md.number(diff['difference'])} (95% CI {md.interval(lo, hi)}, permutation p = "
                f"{md.number(diff['p_value'], 4)}). On this model the seed paper's reading does not hold.")
    return (f"The image shares of right and wrong answers do not differ clearly: the difference of means is "
            f"{md.number(diff['difference'])} (95% CI {md.interval(lo, hi)}, permutation p = "
            f"{md.number(diff['p_value'], 4)}); the interval includes zero.")


def render(study: dict[str, Any]) -> str:
    res = study["results"]
    share = res["image_share"]
    cfg = study["config"]
    parts = [
        "# Case study: MMVP-style pairs on the demo model",
        "",
        "LVLM-Interpret ([arXiv:2404.03118](https://arxiv.org/abs/2404.03118)) analyses LLaVA on the MMVP "
        "benchmark ([arXiv:2401.06209](https://arxiv.org/abs/2401.06209)): pairs of images that a CLIP encoder "
        "sees as alike but that differ in a detail the question is about. From a few examples it reads that "
        "the model stays right when its answer draws on the image more than on the question's wording. "
        "This page asks the same question of many pairs with numbers, on the embedded demo model.",
        "",
        "## Setup",
        "",
        f"- **Pairs:** {res['pairs']} (seed {cfg['seed']}), {res['samples']} samples. Each pair is a scene of the demo "
        "world and the same scene with one detail changed so that the right answer changes "
        "(`xmllm.explainers.demo.samples.make_pair`), over the five question types.",
        f"- **Model:** {md.code(study['model']['spec'])}, weights SHA-256 {md.code(study['model']['weights_sha256'][:16])}…",
        f"- **Image vs text share:** explainer {md.code(study['explainer'])}: Chefer et al.'s relevancy of the "
        "whole answer over the final sequence, split into image tokens and prompt-text tokens "
        "(shares sum to one).",
        "- **Edits:** every member's rephrasings (same meaning, same right answer) and its recolouring "
        "(the asked-about object gets another colour; the right answer changes for colour questions and "
        "some presence/count ones, not for others).",
        "- **Intervals:** 95% Wilson intervals for proportions, 95% percentile bootstrap "
        "intervals for means (2000 resamples, fixed seed), and a two-sided permutation test "
        "(5000 permutations) for the difference of means.",
        "",
        "## Answers",
        "",
        md.table(["Measure", "Value"], [
            ["Accuracy (all samples)", _prop(res["accuracy"])],
            ["Pair accuracy (both members right; MMVP's score)", _prop(res["pair_accuracy"])],
            ["Pairs with exactly one member right", _prop(res["pairs_one_right"])],
        ]),
        "",
        "## Image share against correctness",
        "",
        _verdict(share),
        "",
        md.table(["Group", "Mean image share"], [
            ["All samples", _mean(share["all"])],
            ["Right answers", _mean(share["right"])],
            ["Wrong answers", _mean(share["wrong"])],
            ["Pairs with both right (pair mean)", _mean(share["pairs"]["both_right"])],
            ["Other pairs (pair mean)", _mean(share["pairs"]["not_both_right"])],
        ]),
        "",
        f"Point-biserial correlation of image share with correctness: {md.number(share['point_biserial'])}.",
        "",
        f"![Image share of right and wrong answers, and accuracy by image-share quartile]({relative(CASESTUDY_PAGE, PLOT)})",
        "",
    ]
    if share["by_quartile"]:
        parts += [md.table(["Image-share quartile", "Share range", "Accuracy"], [
            [f"Q{q['quartile']}", f"{md.number(q['share_min'])}&ndash;{md.number(q['share_max'])}", _prop(q)]
            for q in share["by_quartile"]]), ""]

    parts += ["## Flips under rephrasing and recolouring", ""]
    rows = []
    for kind, f in res["flips"].items():
        name = md.text(kind)
        rows.append([f"{name}: answer changed where the right answer did not",
                     _prop(f["right_answer_unchanged"]["flip"])])
        rows.append([f"{name}: the same, among originals answered right",
                     _prop(f["right_answer_unchanged"]["flip_when_original_right"])])
        if f["right_answer_changed"]["followed"]["n"]:
            rows.append([f"{name}: the right answer changed and the model followed",
                         _prop(f["right_answer_changed"]["followed"])])
        rows.append([f"{name}: right after the edit", _prop(f["correct_after"])])
        rows.append([f"{name}: image share of originals whose answer changed", _mean(f["image_share_flipped"])])
        rows.append([f"{name}: image share of originals whose answer stayed", _mean(f["image_share_stayed"])])
    parts += [md.table(["Measure", "Value"], rows), "",
              "A rephrasing keeps the right answer, so any change of answer is a flip the wording caused. "
              "A recolouring changes the right answer only for some questions: there the model should "
              "follow the image (\"followed\" = right after the edit); elsewhere any change is a flip.", ""]

    parts += ["## Per question type", "",
              md.table(["Question type", "Accuracy", "Mean image share"],
                       [[md.cell(qtype), _prop(r), md.number(r["image_share"])]
                        for qtype, r in res["question_types"].items()]),
              ""]

    wrong = [s for s in study["samples"] if not s["correct"]][:EXAMPLE_ROWS]
    parts += ["## Wrong answers (first few)", ""]
    if wrong:
        parts += [md.table(["Sample", "Question", "Expected", "Answer", "Image share"],
                           [[md.code(s["id"]), md.cell(s["question"]), md.code(s["expected"]), md.code(s["answer"]),
                             md.number(s["image_share"])] for s in wrong]), ""]
    else:
        parts += ["None.", ""]
    parts += [f"Every record (samples and edits) is in [results.json]({relative(CASESTUDY_PAGE, RESULTS)}). "
              f"Redo it with {md.code('xmllm build --pairs ' + str(cfg['pairs']))}.", ""]
    return "\n".join(parts)


def generate(study: dict[str, Any], plot_svg: bytes) -> SiteOutput:
    out = SiteOutput()
    out.add(CASESTUDY_PAGE, render(study))
    out.add(PLOT, plot_svg)
    out.add(RESULTS, json.dumps(study, indent=1, sort_keys=True, ensure_ascii=False))
    return out
