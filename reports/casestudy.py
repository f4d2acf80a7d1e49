"""The seed paper's MMVP case study, redone on the demo model with numbers.

LVLM-Interpret (Stan et al. 2024, arXiv 2404.03118) looks at LLaVA on MMVP pairs (two images a
vision encoder sees as alike, with a visible difference that changes the answer) and reports,
from pictures of a few examples, that answers stay right when the model draws on the image more
than on the question's wording. Here the same question is asked of many pairs of the demo world
(:func:`xmllm.explainers.demo.samples.make_pair`: one detail of the scene changed, and with it the
answer), and measured:

- for every sample, the model's greedy answer, whether it is right, and the image-vs-text share
  of its relevancy (:class:`~xmllm.explainers.methods.relevancy.ModalityRelevancy`, Chefer et al.'s
  rules on the final sequence);
- the mean image share of right and of wrong answers, with 95% bootstrap intervals, their
  difference with a permutation-test p-value, and accuracy by image-share quartile;
- pair accuracy (both members right), MMVP's own score;
- how often the answer flips when only the wording changes (rephrasing: the right answer stays
  the same) and when only the asked-about object's colour changes (recolouring: the right answer
  may change or not), each with a 95% Wilson interval.

Every number is reproducible from the model's weights, the seed and the pair count; every model
result goes through the build's cache.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from xmllm.explainers.methods.relevancy import ModalityRelevancy

if TYPE_CHECKING:  # pragma: no cover
    from xmllm.explainers.demo.samples import DemoSample

    from .session import ModelSession

EXPLAINER = ModalityRelevancy.id
"""The study is about this method: the seed paper's image-vs-text relevancy share, which it reports."""
DEFAULT_PAIRS = 100
DEFAULT_SEED = 2024
BOOTSTRAP = 2000
PERMUTATIONS = 5000
STATS_SEED = 0
"""Seed of the bootstrap and permutation draws (the numbers must not move between builds)."""
EDIT_KINDS = ("rephrase", "recolour")
MAX_TRIES_PER_PAIR = 10
"""Scenes drawn per wanted pair before giving up (make_pair fails for a few questions)."""


@dataclass(frozen=True)
class CaseStudyConfig:
    pairs: int = DEFAULT_PAIRS
    seed: int = DEFAULT_SEED

    def __post_init__(self) -> None:
        if self.pairs < 1:
            raise ValueError(f"the case study needs at least one pair, got {self.pairs}")


# --- statistics ------------------------------------------------------------------------------------


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion."""
    from xmllm.explainers.demo.evaluate import wilson as _wilson

    return _wilson(k, n, z)


def proportion(flags: Sequence[bool]) -> dict[str, Any]:
    k, n = int(sum(flags)), len(flags)
    lo, hi = wilson(k, n)
    return {"k": k, "n": n, "rate": k / n if n else None, "interval": [lo, hi] if n else [None, None]}


def mean_interval(values: Sequence[float], rng: np.random.Generator) -> dict[str, Any]:
    """Mean with a 95% percentile bootstrap interval (None where there are no values)."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return {"n": 0, "mean": None, "interval": [None, None]}
    means = x[rng.integers(0, x.size, size=(BOOTSTRAP, x.size))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"n": int(x.size), "mean": float(x.mean()), "interval": [float(lo), float(hi)]}


def difference(a: Sequence[float], b: Sequence[float], rng: np.random.Generator) -> dict[str, Any]:
    """mean(a) - mean(b): bootstrap 95% interval and a two-sided permutation p-value."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.size == 0 or y.size == 0:
        return {"difference": None, "interval": [None, None], "p_value": None}
    observed = float(x.mean() - y.mean())
    boot = (x[rng.integers(0, x.size, size=(BOOTSTRAP, x.size))].mean(axis=1)
            - y[rng.integers(0, y.size, size=(BOOTSTRAP, y.size))].mean(axis=1))
    lo, hi = np.percentile(boot, [2.5, 97.5])
    pooled = np.concatenate([x, y])
    extreme = 0
    for _ in range(PERMUTATIONS):
        perm = rng.permutation(pooled)
        extreme += abs(perm[: x.size].mean() - perm[x.size:].mean()) >= abs(observed) - 1e-12
    return {"difference": observed, "interval": [float(lo), float(hi)],
            "p_value": (extreme + 1) / (PERMUTATIONS + 1)}


def point_biserial(shares: Sequence[float], correct: Sequence[bool]) -> float | None:
    """Correlation of image share with correctness (None when either is constant)."""
    x, y = np.asarray(shares, dtype=float), np.asarray(correct, dtype=float)
    if x.size < 2 or x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def quartile_accuracy(shares: Sequence[float], correct: Sequence[bool]) -> list[dict[str, Any]]:
    """Accuracy within each quarter of the samples sorted by image share."""
    x, y = np.asarray(shares, dtype=float), np.asarray(correct, dtype=bool)
    if x.size < 4:
        return []
    order = np.argsort(x, kind="stable")
    out = []
    for q, idx in enumerate(np.array_split(order, 4)):
        row = proportion(list(y[idx]))
        row.update({"quartile": q + 1, "share_min": float(x[idx].min()), "share_max": float(x[idx].max())})
        out.append(row)
    return out


# --- the samples -----------------------------------------------------------------------------------


def draw_pairs(config: CaseStudyConfig) -> list[tuple["DemoSample", "DemoSample"]]:
    """``config.pairs`` MMVP-style pairs: sample ``i`` of the seed and its one-detail partner."""
    from xmllm.explainers.demo.samples import generate_sample, make_pair

    pairs, index = [], 0
    while len(pairs) < config.pairs:
        if index >= config.pairs * MAX_TRIES_PER_PAIR:
            raise ValueError(f"only {len(pairs)} of {config.pairs} pairs found in {index} scenes of seed {config.seed}")
        sample = generate_sample(config.seed, index)
        index += 1
        partner = make_pair(sample, config.seed)
        if partner is not None:
            pairs.append((sample, partner))
    return pairs


def edits(sample: "DemoSample", seed: int) -> list[tuple[str, "DemoSample"]]:
    """The sample's rephrasings and its recolouring, as (kind, edited sample)."""
    from xmllm.explainers.demo.samples import counterfactuals

    out = []
    for edited in counterfactuals(sample, seed):
        kind = edited.id.rsplit("-", 1)[-1].rstrip("0123456789")
        if kind in EDIT_KINDS:
            out.append((kind, edited))
    return out


# --- running ---------------------------------------------------------------------------------------


def _sample_record(session: "ModelSession", sample: "DemoSample", pair: str, role: str) -> dict[str, Any]:
    from xmllm.explainers.answering import is_correct
    from xmllm.explainers.demo.samples import to_explain_sample

    explain_sample = to_explain_sample(sample)
    record: dict[str, Any] = {
        "id": sample.id, "pair": pair, "role": role, "question_type": sample.question_type, "question": sample.text,
        "expected": sample.answer, "image_share": None, "text_share": None, "seconds": None,
    }
    answer = session.answer(explain_sample)
    if not answer["token_ids"]:  # an empty answer: wrong, and nothing to explain
        return {**record, "answer": "", "correct": False, "answer_prob": None}
    folder, _ = session.run(explain_sample, EXPLAINER)
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    header = next(e for e in manifest["explanations"] if e["explainer"] == EXPLAINER)
    text = manifest["answer"]["text"]
    image, prompt = header["scores"].get("image_share"), header["scores"].get("text_share")
    return {
        **record,
        "answer": text,
        "correct": is_correct(text, sample.answer),
        "answer_prob": float(np.prod(manifest["answer"]["probs"])) if manifest["answer"]["probs"] else None,
        "image_share": None if image is None or math.isnan(image) else float(image),
        "text_share": None if prompt is None or math.isnan(prompt) else float(prompt),
        "seconds": manifest.get("timings_seconds", {}).get(EXPLAINER),
    }


def _edit_record(session: "ModelSession", original: dict[str, Any], source: "DemoSample", kind: str,
                 edited: "DemoSample") -> dict[str, Any]:
    from xmllm.explainers.answering import is_correct, normalise
    from xmllm.explainers.demo.samples import to_explain_sample

    got = session.answer(to_explain_sample(edited))
    return {
        "id": edited.id, "of": source.id, "kind": kind, "edit": edited.edit, "question": edited.text,
        "expected": edited.answer, "expected_changed": normalise(edited.answer) != normalise(source.answer),
        "answer": got["text"], "correct": is_correct(got["text"], edited.answer),
        "changed": normalise(got["text"]) != normalise(original["answer"]),
        "original_correct": original["correct"], "original_image_share": original["image_share"],
    }


def collect(session: "ModelSession", config: CaseStudyConfig, progress: bool = True,
            on_pair: Callable[[], None] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Every model result the analysis needs: pair members, then their edits."""
    import sys

    from tqdm import tqdm

    pairs = draw_pairs(config)
    samples, edit_rows = [], []
    with tqdm(total=len(pairs), desc="case study", unit="pair", file=sys.stderr, disable=not progress) as bar:
        for a, b in pairs:
            pair_id = a.id
            for role, member in (("a", a), ("b", b)):
                record = _sample_record(session, member, pair_id, role)
                samples.append(record)
                for kind, edited in edits(member, config.seed):
                    edit_rows.append(_edit_record(session, record, member, kind, edited))
            bar.update(1)
            if on_pair is not None:
                on_pair()
    return {"samples": samples, "edits": edit_rows}


# --- the analysis ----------------------------------------------------------------------------------


def analyse(samples: list[dict[str, Any]], edit_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The numbers of the case study from the per-sample and per-edit records."""
    rng = np.random.default_rng(STATS_SEED)
    right = [s["image_share"] for s in samples if s["correct"] and s["image_share"] is not None]
    wrong = [s["image_share"] for s in samples if not s["correct"] and s["image_share"] is not None]
    with_share = [s for s in samples if s["image_share"] is not None]

    by_pair: dict[str, list[dict[str, Any]]] = {}
    for s in samples:
        by_pair.setdefault(s["pair"], []).append(s)
    both = [all(m["correct"] for m in members) for members in by_pair.values()]
    one = [sum(m["correct"] for m in members) == 1 for members in by_pair.values()]
    pair_share = {
        "both_right": mean_interval([np.mean([m["image_share"] for m in ms]) for ms in by_pair.values()
                                     if all(m["correct"] for m in ms)
                                     and all(m["image_share"] is not None for m in ms)], rng),
        "not_both_right": mean_interval([np.mean([m["image_share"] for m in ms]) for ms in by_pair.values()
                                         if not all(m["correct"] for m in ms)
                                         and all(m["image_share"] is not None for m in ms)], rng),
    }

    question_types: dict[str, dict[str, Any]] = {}
    for qtype in sorted({s["question_type"] for s in samples}):
        rows = [s for s in samples if s["question_type"] == qtype]
        shares = [s["image_share"] for s in rows if s["image_share"] is not None]
        question_types[qtype] = {**proportion([s["correct"] for s in rows]),
                                 "image_share": float(np.mean(shares)) if shares else None}

    flips: dict[str, Any] = {}
    for kind in EDIT_KINDS:
        rows = [e for e in edit_rows if e["kind"] == kind]
        same = [e for e in rows if not e["expected_changed"]]
        moved = [e for e in rows if e["expected_changed"]]
        flipped = [e["original_image_share"] for e in rows if e["changed"] and e["original_image_share"] is not None]
        stayed = [e["original_image_share"] for e in rows if not e["changed"] and e["original_image_share"] is not None]
        flips[kind] = {
            "edits": len(rows),
            "answer_changed": proportion([e["changed"] for e in rows]),
            "correct_after": proportion([e["correct"] for e in rows]),
            "right_answer_unchanged": {
                "flip": proportion([e["changed"] for e in same]),
                "flip_when_original_right": proportion([e["changed"] for e in same if e["original_correct"]]),
            },
            "right_answer_changed": {
                "followed": proportion([e["correct"] for e in moved]),
                "answer_changed": proportion([e["changed"] for e in moved]),
            },
            "image_share_flipped": mean_interval(flipped, rng),
            "image_share_stayed": mean_interval(stayed, rng),
        }

    return {
        "samples": len(samples),
        "pairs": len(by_pair),
        "accuracy": proportion([s["correct"] for s in samples]),
        "pair_accuracy": proportion(both),
        "pairs_one_right": proportion(one),
        "image_share": {
            "all": mean_interval([s["image_share"] for s in with_share], rng),
            "right": mean_interval(right, rng),
            "wrong": mean_interval(wrong, rng),
            "right_minus_wrong": difference(right, wrong, rng),
            "point_biserial": point_biserial([s["image_share"] for s in with_share], [s["correct"] for s in with_share]),
            "by_quartile": quartile_accuracy([s["image_share"] for s in with_share], [s["correct"] for s in with_share]),
            "pairs": pair_share,
        },
        "question_types": question_types,
        "flips": flips,
    }


def run_case_study(session: "ModelSession", config: CaseStudyConfig, progress: bool = True,
                   on_pair: Callable[[], None] | None = None) -> dict[str, Any]:
    """Collect and analyse; the result holds its config, the model, the numbers and the records.

    ``on_pair`` is called after each pair (a second process reports its progress through it)."""
    records = collect(session, config, progress, on_pair)
    return {
        "config": asdict(config),
        "explainer": EXPLAINER,
        "model": {"spec": session.spec, "weights_sha256": session.weights},
        "results": analyse(records["samples"], records["edits"]),
        **records,
    }


def plot(study: dict[str, Any], path: Any) -> None:
    """Two panels as SVG: image share of right vs wrong answers, and accuracy by share quartile."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = study["results"]["image_share"]
    right = [s["image_share"] for s in study["samples"] if s["correct"] and s["image_share"] is not None]
    wrong = [s["image_share"] for s in study["samples"] if not s["correct"] and s["image_share"] is not None]
    rng = np.random.default_rng(STATS_SEED)
    with plt.rc_context({"svg.hashsalt": "xmllm-casestudy", "svg.fonttype": "path", "font.size": 9}):
        fig, (left, right_ax) = plt.subplots(1, 2, figsize=(8.5, 3.4), constrained_layout=True)
        for x, (label, values, summary, colour) in enumerate(
                (("right", right, res["right"], "#2e7d32"), ("wrong", wrong, res["wrong"], "#c62828"))):
            if values:
                left.scatter(x + rng.uniform(-0.18, 0.18, len(values)), values, s=9, alpha=0.45, color=colour,
                             linewidths=0)
            if summary["mean"] is not None:
                lo, hi = summary["interval"]
                left.errorbar([x + 0.32], [summary["mean"]], yerr=[[summary["mean"] - lo], [hi - summary["mean"]]],
                              fmt="o", color="black", capsize=4)
        left.set_xticks([0, 1], [f"right (n={len(right)})", f"wrong (n={len(wrong)})"])
        left.set_xlim(-0.6, 1.6)
        left.set_ylim(0, 1)
        left.set_ylabel("image share of relevancy")
        left.set_title("Image share by correctness (mean, 95% CI)")
        quart = res["by_quartile"]
        if quart:
            xs = np.arange(len(quart))
            rates = [q["rate"] for q in quart]
            err = [[q["rate"] - q["interval"][0] for q in quart], [q["interval"][1] - q["rate"] for q in quart]]
            right_ax.bar(xs, rates, color="#5c6bc0", alpha=0.8)
            right_ax.errorbar(xs, rates, yerr=err, fmt="none", color="black", capsize=4)
            right_ax.set_xticks(xs, [f"Q{q['quartile']}\n{q['share_min']:.2f}-{q['share_max']:.2f}" for q in quart])
        right_ax.set_ylim(0, 1)
        right_ax.set_ylabel("accuracy")
        right_ax.set_title("Accuracy by image-share quartile (95% Wilson)")
        fig.savefig(path, format="svg", metadata={"Date": None})
        plt.close(fig)
