"""The site page "Which explainer to trust": the evaluation's table, flags, plots and method.

``trust_page_markdown(result)`` renders the page from the evaluation's JSON; ``write_plots``
draws its static PNGs (matplotlib, no JavaScript, nothing loaded from outside);
``write_trust_page(result_json_path, site_dir)`` does both into the site's generated folder.
Every string that came from the user or the model (model spec, sample ids, explainer ids) is
escaped for Markdown and HTML before it reaches the page.
"""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from xmllm.errors import XmllmError
from xmllm.files import atomic, write_atomic
from xmllm.evaluation.scoring import FORMAT_VERSION, RANDOM_LABEL
from .table import arrow, cell, row_label

PAGE_NAME = "trust.md"
GENERATED = "generated"
PLOTS = {"curves": "trust-curves.png", "metrics": "trust-metrics.png", "sanity": "trust-sanity.png"}
REQUIRED_KEYS = ("format", "model", "samples", "config", "metrics", "table", "flags", "verdict", "timings")
DPI = 110
FLAGGED_COLOUR, TRUSTED_COLOUR, FLOOR_COLOUR = "#c0392b", "#1f6fb2", "#555555"
_MARKDOWN_SPECIALS = "\\`*_[]#"


def md(text: Any) -> str:
    """``text`` safe inside Markdown prose and table cells: specials backslash-escaped, HTML
    characters and pipes as entities, line breaks as spaces."""
    out = str(text)
    for ch in _MARKDOWN_SPECIALS:
        out = out.replace(ch, "\\" + ch)
    out = html.escape(out, quote=False).replace("|", "&#124;")
    return " ".join(out.split())


def code(text: Any) -> str:
    """``text`` as a Markdown code span: backticks and line breaks removed (the span itself
    escapes HTML, so nothing else is)."""
    return "`" + " ".join(str(text).replace("`", "").split()) + "`"


def _metric_header(metric: dict[str, Any]) -> str:
    return f"{md(metric['title'])} {arrow(metric)}"


def _score_table(result: dict[str, Any]) -> list[str]:
    metrics = result["metrics"]
    sanity = result.get("sanity") or {}
    lines = ["| Explainer | " + " | ".join(_metric_header(m) for m in metrics) + " | Sanity ρ | Verdict |",
             "|---|" + "---|" * (len(metrics) + 2)]
    for eid in [*result["config"]["explainers"], RANDOM_LABEL]:
        flags = result["flags"].get(eid, [])
        if eid == RANDOM_LABEL:
            verdict, rho = "floor", ""
        else:
            verdict = "⚠ " + ", ".join(md(f["kind"]) for f in flags) if flags else "✓ trusted"
            check = sanity.get("explainers", {}).get(eid)
            rho = "n/a" if not check or check.get("final") is None else f"{check['final']:.2f}"
        name = f"*{md(row_label(eid))}*" if eid == RANDOM_LABEL else md(eid)
        cells = [cell(result["table"][eid].get(m["name"])) for m in metrics]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {rho} | {verdict} |")
    return lines


def _sanity_section(result: dict[str, Any]) -> list[str]:
    sanity = result.get("sanity")
    if not sanity:
        return ["The randomisation check was not run (`--sanity-samples 0`)."]
    stages = sanity["stages"]
    lines = [
        f"Following {md(sanity['reference'])}, the model's weights are re-initialised cumulatively, decoder blocks "
        f"from the top down and then the vision tower, and each explainer explains the original answer again on "
        f"{sanity['samples']} samples. Each cell is the mean Spearman rank correlation with the intact model's map "
        f"(1: unchanged). An explainer whose maps keep a mean of at least {sanity['threshold']} with everything "
        "randomised is flagged: its maps follow the input, not the model.",
        "",
        "| Explainer | " + " | ".join(md(s) for s in stages) + " | Survives |",
        "|---|" + "---|" * (len(stages) + 1),
    ]
    for eid, check in sanity["explainers"].items():
        values = [("n/a" if row["mean"] is None else f"{row['mean']:.2f}") for row in check["stages"]]
        survives = "⚠ yes" if check["survives"] else "no"
        lines.append(f"| {md(eid)} | " + " | ".join(values) + f" | {survives} |")
    lines += ["", f"![Rank correlation with the intact model's maps as the model is randomised]({PLOTS['sanity']})"]
    return lines


def _question_type_section(result: dict[str, Any]) -> list[str]:
    # "families": the key's name in an evaluation.json of xmllm 0.2
    by_type = result.get("question_types") or result.get("families") or {}
    names = sorted({t for per in by_type.values() for t in per})
    if not names:
        return []
    lines = ["## Pointing game by question type", "",
             "| Explainer | " + " | ".join(md(t) for t in names) + " |",
             "|---|" + "---|" * len(names)]
    for eid in [*result["config"]["explainers"], RANDOM_LABEL]:
        per = by_type.get(eid, {})
        values = [("n/a" if per.get(t, {}).get("mean") is None else f"{per[t]['mean']:.2f} (n={per[t]['n']})")
                  for t in names]
        lines.append(f"| {md(row_label(eid))} | " + " | ".join(values) + " |")
    return lines + [""]


def _method_section(result: dict[str, Any]) -> list[str]:
    config = result["config"]
    lines = ["## How these numbers are made", ""]
    for metric in result["metrics"]:
        better = "higher is better" if metric["higher_is_better"] else "lower is better"
        lines.append(f"- **{md(metric['title'])}** ({better}; {md(metric['reference'])}): {md(metric['summary'])}")
    lines += [
        "",
        f"- Ground truth: the cells of the image grid at least a tenth covered by the objects the answer depends "
        f"on, the mask passed through the model's own processor. Samples with ground truth: "
        f"{result['samples']['with_truth']} of {result['samples']['n']}.",
        f"- Curves: {config['steps']} steps over the grid's cells, perturbed cells set to the "
        f"{md(config['baseline'])} baseline through the processor; the score is the probability of the model's "
        "whole answer; ties in a map are broken by one seeded permutation per sample.",
        "- Random floor: a map of uniform random values per sample, scored exactly like the explainers' maps.",
        "- Intervals: 95% bootstrap percentile intervals of the mean (2000 resamples, fixed seed). An explainer is "
        "flagged *unfaithful* unless its deletion-area interval lies wholly below the random floor's.",
        "- Scored map per explainer: " + "; ".join(f"{md(e)}: {md(n)}" for e, n in result.get("maps", {}).items()),
        "- Evaluation parameters: " + "; ".join(
            f"{md(e)} {md(json.dumps(p, sort_keys=True))}" for e, p in config["params"].items() if p) + ".",
    ]
    timing = result["timings"]
    lines.append(f"- Cost: {timing['per_sample']['wall_seconds']:.2f} s per sample wall clock "
                 f"({timing['per_sample']['cpu_seconds']:.2f} s CPU, torch threads: {timing['threads']}), the sanity check "
                 f"{timing['sanity']['wall_seconds']:.0f} s; total {timing['total_wall_seconds']:.0f} s.")
    return lines


def trust_page_markdown(result: dict[str, Any]) -> str:
    """The "Which explainer to trust" page, Markdown for MkDocs; plots referenced by file name."""
    check_result(result)
    model = result["model"]
    samples = result["samples"]
    verdict = result["verdict"]
    source = samples.get("source", "samples")
    pictures = bool(samples.get("pictures"))
    kind = "demo questions over two pictures or a clip's three frames" if pictures else "object-grounded demo questions"
    what = (f"{samples['n']} {kind} (seed {samples.get('seed', result['config']['seed'])})"
            if source == "demo" else f"{samples['n']} samples from {md(samples.get('path', source))}")
    lines = [
        "# Which explainer to trust",
        "",
        f"Every image-map explainer, scored against ground truth and against a random map on {what}, with "
        f"model {md(model.get('spec', '?'))} ({md(model.get('model_type', model.get('source', '')))}). "
        f"Evaluated {md(result.get('created', ''))}; reproduce with "
        + code(f"xmllm evaluate --model {model.get('spec', 'demo')} "
               + (f"--demo{'-pictures' if pictures else ''} {samples['n']}" if source == "demo" else "--samples FILE")
               + f" --seed {result['config']['seed']}") + ".",
        "",
        "## Verdict",
        "",
    ]
    if verdict.get("provisional"):
        lines += [f"!!! warning \"Provisional\"\n    Only {verdict['grounded_samples']} samples with ground truth "
                  f"(fewer than {verdict['min_samples']}): the 95% intervals are wide, and a verdict below can change "
                  "with more samples. Run the evaluation on more questions before relying on it.", ""]
    if verdict["trusted"]:
        lines.append("- **Trust**: " + ", ".join(md(e) for e in verdict["trusted"])
                     + " (deletion beats the random floor; maps change when the model is randomised).")
    for eid in verdict["flagged"]:
        lines.append(f"- **Do not trust {md(eid)}**: " + "; ".join(md(f["text"]) for f in result["flags"][eid]) + ".")
    if verdict["best_pointing"]:
        met = "meets" if verdict["meets_pointing_bar"] else "does not meet"
        lines.append(f"- Best pointing game among the trusted explainers: {md(verdict['best_pointing'])} at "
                     f"{verdict['best_pointing_game']:.3f}, which {met} the bar of {verdict['pointing_bar']}.")
    elif verdict["trusted"] or verdict["flagged"]:
        lines.append("- No trusted explainer has a pointing game to report.")
    for eid, warned in result.get("warnings", {}).items():
        lines.append(f"- **{md(eid)} warned** on {warned['count']} of {samples['n']} samples (first "
                     f"{md(warned['first'])}): its scores there are of maps it does not vouch for.")
    if verdict.get("best_flagged"):
        lines.append(f"- {md(verdict['best_flagged'])} points better ({verdict['best_flagged_pointing_game']:.3f}) but "
                     "is flagged above, so it is not counted as the best.")
    lines += [
        "",
        "## Scores",
        "",
        "Mean [95% interval] over samples; ↑ higher is better, ↓ lower is better.",
        "",
        *_score_table(result),
        "",
        f"![Mean deletion and insertion curves per explainer]({PLOTS['curves']})",
        "",
        f"![Each metric per explainer with its interval, against the random floor]({PLOTS['metrics']})",
        "",
        "## Sanity check: model randomisation",
        "",
        *_sanity_section(result),
        "",
        *_question_type_section(result),
        *_method_section(result),
        "",
    ]
    return "\n".join(lines)


# --- plots ---------------------------------------------------------------------------------------------


def _save(fig: Any, path: Path) -> None:
    atomic(path, lambda fh: fig.savefig(fh, format="png", dpi=DPI, metadata={"Software": None}), binary=True)


def write_plots(result: dict[str, Any], folder: Path) -> list[Path]:
    """The page's PNGs in ``folder``: mean curves, metrics against the floor, the sanity cascade."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    ids = list(result["config"]["explainers"])
    flagged = set(result["verdict"]["flagged"])
    fractions = result["config"].get("fractions") or []
    colours = plt.get_cmap("tab10")
    written = []

    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    for ax, kind in zip(axes, ("deletion", "insertion")):
        for i, eid in enumerate([*ids, RANDOM_LABEL]):
            curve = result.get("curves", {}).get(eid, {}).get(kind)
            if not curve or len(curve) != len(fractions):
                continue
            style = {"color": "black", "linestyle": "--", "linewidth": 2} if eid == RANDOM_LABEL else {
                "color": colours(i % 10), "linestyle": ":" if eid in flagged else "-"}
            ax.plot(fractions, curve, label=row_label(eid), **style)
        ax.set_title(f"{kind.capitalize()} ({'lower' if kind == 'deletion' else 'higher'} area is better)")
        ax.set_xlabel("fraction of cells " + ("removed" if kind == "deletion" else "inserted") + ", most relevant first")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean probability of the answer")
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    _save(fig, folder / PLOTS["curves"])
    plt.close(fig)
    written.append(folder / PLOTS["curves"])

    metrics = result["metrics"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 0.35 * len(ids) + 1.6), sharey=True)
    for ax, metric in zip(axes if len(metrics) > 1 else [axes], metrics):
        floor = result["table"][RANDOM_LABEL].get(metric["name"], {})
        if floor.get("mean") is not None:
            ax.axvspan(floor["low"], floor["high"], color=FLOOR_COLOUR, alpha=0.2)
            ax.axvline(floor["mean"], color=FLOOR_COLOUR, linestyle="--", label="random floor")
        for y, eid in enumerate(ids):
            entry = result["table"][eid].get(metric["name"], {})
            if entry.get("mean") is None:
                continue
            colour = FLAGGED_COLOUR if eid in flagged else TRUSTED_COLOUR
            ax.errorbar(entry["mean"], y, xerr=[[entry["mean"] - entry["low"]], [entry["high"] - entry["mean"]]],
                        fmt="o", color=colour, capsize=3)
        ax.set_title(f"{metric['title']} {arrow(metric)}", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    first = axes[0] if len(metrics) > 1 else axes
    first.set_yticks(range(len(ids)), ids, fontsize=8)
    first.invert_yaxis()
    fig.tight_layout()
    _save(fig, folder / PLOTS["metrics"])
    plt.close(fig)
    written.append(folder / PLOTS["metrics"])

    sanity = result.get("sanity")
    if sanity:
        fig, ax = plt.subplots(figsize=(10, 4))
        stages = sanity["stages"]
        for i, (eid, check) in enumerate(sanity["explainers"].items()):
            means = [row["mean"] if row["mean"] is not None else float("nan") for row in check["stages"]]
            ax.plot(range(len(stages)), means, marker="o", color=colours(i % 10), label=eid,
                    linestyle=":" if check["survives"] else "-")
        ax.axhline(sanity["threshold"], color=FLAGGED_COLOUR, linestyle="--", label="flag threshold")
        ax.set_xticks(range(len(stages)), stages, rotation=20, fontsize=8)
        ax.set_ylabel("Spearman ρ with the intact model's map")
        ax.set_xlabel("randomised, cumulatively")
        ax.set_ylim(-1.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
        fig.tight_layout()
        _save(fig, folder / PLOTS["sanity"])
        plt.close(fig)
        written.append(folder / PLOTS["sanity"])
    return written


# --- files ---------------------------------------------------------------------------------------------


def check_result(result: Any, where: str = "evaluation result") -> dict[str, Any]:
    if not isinstance(result, dict):
        raise XmllmError(f"{where}: not a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in result]
    if missing:
        raise XmllmError(f"{where}: missing field {missing[0]!r}; write it with 'xmllm evaluate'")
    if result["format"] != FORMAT_VERSION:
        raise XmllmError(f"{where}: format {result['format']!r}, this xmllm reads format {FORMAT_VERSION}")
    return result


def read_result(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise XmllmError(f"{path}: evaluation result not found; run 'xmllm evaluate' first")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise XmllmError(f"{path}: not valid JSON ({str(error).splitlines()[0]})") from None
    return check_result(data, str(path))


def write_page(result: dict[str, Any], folder: Path) -> Path:
    """``trust.md`` and its PNGs in ``folder`` (the page written last, atomically)."""
    text = trust_page_markdown(result)
    folder.mkdir(parents=True, exist_ok=True)
    write_plots(result, folder)
    target = folder / PAGE_NAME
    write_atomic(target, text)
    return target


def write_trust_page(result_json_path: str | Path, site_dir: str | Path) -> Path:
    """Render the evaluation at ``result_json_path`` as ``<site_dir>/generated/trust.md`` (plots beside
    it); ``site_dir`` is the MkDocs source folder, or its ``generated`` folder itself. Returns the page."""
    site_dir = Path(site_dir)
    folder = site_dir if site_dir.name == GENERATED else site_dir / GENERATED
    return write_page(read_result(Path(result_json_path)), folder)
