"""The audit's outputs: the summary files and the site section.

``xmllm run`` writes ``audit.json``, ``summary.html`` and ``run.json`` (:func:`write_summary`),
then ``OUT/site/``: ``index.md`` (the summary as Markdown, every value escaped), ``summary.html``
(the summary page with links only to the reports copied here) and ``reports/<key>.html``
(per-sample reports, flagged samples first, at most ``site.max_reports``). ``xmllm build --audit OUT`` (:func:`site_pages`, called from
:mod:`xmllm.build`) copies each such folder to ``generated/audits/<slug>/`` under the docs
folder and adds an "Audits" section to the nav.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xmllm.errors import XmllmError
from ..site import markdown as mdx
from ..site.pages import GENERATED, SiteOutput, nav_title

if TYPE_CHECKING:  # pragma: no cover
    from .config import LoadedConfig

SITE = "site"
INDEX = "index.md"
REPORTS = "reports"
AUDITS = f"{GENERATED}/audits"
AUDITS_INDEX = f"{AUDITS}/index.md"
"""The nav key of the Audits section (mkdocs.yml need not name it: the build appends it)."""


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60] or "audit"


def write_summary(loaded: LoadedConfig, out: Path, records: list[dict[str, Any]], run_info: dict[str, Any]) -> Path:
    """``audit.json``, ``summary.html``, ``run.json`` and the site pages, each written atomically."""
    import json

    from xmllm.files import write_atomic

    from .store import OutputError
    from .summary import AUDIT_JSON, RUN_JSON, SUMMARY_HTML, build_summary, render_summary

    data = build_summary(loaded, out, records)
    html = render_summary(data)
    for name, text in ((AUDIT_JSON, json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False) + "\n"),
                       (SUMMARY_HTML, html), (RUN_JSON, json.dumps(run_info, indent=1, sort_keys=True) + "\n")):
        try:
            write_atomic(out / name, text)
        except OSError as exc:  # read-only folder, full disk: the file keeps its previous content
            raise OutputError(out / name, exc) from None
    write_site(out, data, html)
    return out / SUMMARY_HTML


def write_site(out: Path, data: dict[str, Any], html: str) -> Path:
    """Write ``out/site/`` whole: into a scratch folder named with this process's id (one left
    by a killed run is removed here), then renamed into place; modes follow the umask."""
    from xmllm.files import make_dir, remove_stale, replace_dir, scratch_dir

    from .store import SITE_SCRATCH, OutputError
    from .summary import SUMMARY_HTML, render_summary

    copied = _chosen_reports(data)
    final = out / SITE
    remove_stale(out, SITE_SCRATCH)
    try:
        tmp = scratch_dir(out, SITE_SCRATCH)
    except OSError as exc:
        raise OutputError(final, exc) from None
    try:
        make_dir(tmp / REPORTS)
        for row in data["samples"]:
            if row["key"] in copied:
                shutil.copyfile(out / row["report"], tmp / REPORTS / f"{row['key']}.html")
        site_data = {**data, "samples": [{**row, "report": f"{REPORTS}/{row['key']}.html" if row["key"] in copied else None}
                                         for row in data["samples"]]}
        (tmp / SUMMARY_HTML).write_text(render_summary(site_data), encoding="utf-8")
        (tmp / INDEX).write_text(markdown_page(site_data), encoding="utf-8")
        replace_dir(tmp, final, old=out / f"{SITE_SCRATCH}{os.getpid()}-old")
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(final, exc) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _chosen_reports(data: dict[str, Any]) -> set[str]:
    limit = int(data["config"].get("site", {}).get("max_reports", 50))
    rows = [r for r in data["samples"] if r["report"]]
    rows.sort(key=lambda r: not r["flags"])  # flagged first, set order kept within each group
    return {r["key"] for r in rows[:limit]}


def markdown_page(data: dict[str, Any]) -> str:
    from .summary import SUMMARY_HTML, visible

    t = lambda v: mdx.text(visible(v))
    c = lambda v: mdx.cell(None if v is None else visible(v))
    counts = data["counts"]
    lines = [
        f"# Audit: {t(data['name'])}", "",
        (f"Model {mdx.code(visible(data['config']['model']))}, {counts['samples']} samples, "
         f"seed {data['config']['seed']}. Accuracy {mdx.percent(data['accuracy'])} ({counts['correct']} of "
         f"{counts['graded']} with an expected answer); {counts['failed']} failed, {counts['flagged']} flagged. "
         f"[The full summary page]({SUMMARY_HTML})."), "",
        "## Image reliance", "",
        (f"Mean drop of the answer's log-probability with a blank image: "
         f"{mdx.number(data['reliance']['mean_drop_blank'])}; {data['reliance']['reliant_samples']} of "
         f"{data['reliance']['samples']} answers rely on the image."), "",
        mdx.table(["drop (blank)", "samples"], [[mdx.text(label), str(n)] for label, n in
                                                zip(data["reliance"]["histogram"]["labels"],
                                                    data["reliance"]["histogram"]["counts"])]), "",
        "## Hallucination checks", "",
    ]
    checks = data["checks"]
    rows = []
    if "blank_image" in checks:
        p = checks["blank_image"]
        rows.append(["blank image: answer flips", str(p["asked"]), mdx.percent(p["flip_rate"])])
    if "pope" in checks:
        p = checks["pope"]
        rows.append(["POPE-style: yes to an absent object", str(p["asked"]), mdx.percent(p["hallucination_rate"])])
    lines += [mdx.table(["check", "asked", "rate"], rows) if rows else "No check was run.", ""]
    lines += ["## Faithfulness of image maps", ""]
    if data["faithfulness"]:
        lines.append(mdx.table(["map", "samples", "deletion area (lower better)", "insertion area", "beats random"],
                               [[mdx.code(name), str(r["samples"]), mdx.number(r["deletion_area"]),
                                 mdx.number(r["insertion_area"]), mdx.percent(r["beats_random"])]
                                for name, r in data["faithfulness"].items()]))
    else:
        lines.append("No explainer with an image map was run.")
    flagged = [r for r in data["samples"] if r["flags"]]
    lines += ["", f"## Flagged samples ({len(flagged)})", ""]
    if flagged:
        lines.append(mdx.table(["sample", "question", "answer", "expected", "why"], [
            [mdx.link(visible(r["id"]), r["report"]) if r["report"] else c(r["id"]), c(r["question"]), c(r["answer"]),
             c(r["expected"]), c(", ".join(f["kind"] for f in r["flags"]))] for r in flagged]))
    else:
        lines.append("None.")
    failed = [r for r in data["samples"] if r["status"] == "failed"]
    if failed:
        lines += ["", f"## Failed samples ({len(failed)})", "",
                  mdx.table(["sample", "error"], [[c(r["id"]), c(r["error"])] for r in failed])]
    return "\n".join(lines) + "\n"


# --- the build hook ------------------------------------------------------------------------------------


def site_pages(audits: list[Path]) -> SiteOutput:
    """Each audit folder's ``site/`` under ``generated/audits/<slug>/``, an index of them, and
    the nav section keyed by :data:`AUDITS_INDEX`."""
    import json

    from .summary import AUDIT_JSON

    out = SiteOutput()
    entries: list[Any] = []
    index_rows = []
    taken: set[str] = set()
    for folder in audits:
        folder = Path(folder)
        site, summary = folder / SITE, folder / AUDIT_JSON
        if not (site / INDEX).is_file() or not summary.is_file():
            raise XmllmError(f"--audit {folder}: not a finished audit (no {SITE}/{INDEX} or {AUDIT_JSON}; "
                             "run 'xmllm run CONFIG' to the end)")
        try:
            data = json.loads(summary.read_text(encoding="utf-8"))
            name = str(data["name"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise XmllmError(f"{summary}: not an audit summary ({type(exc).__name__})") from None
        base = slug(name)
        key, n = base, 2
        while key in taken:
            key, n = f"{base}-{n}", n + 1
        taken.add(key)
        for path in sorted(site.rglob("*")):
            if path.is_file() and not path.is_symlink():
                rel = path.relative_to(site).as_posix()
                out.add(f"{AUDITS}/{key}/{rel}", path.read_bytes())
        entries.append({nav_title(name): f"{AUDITS}/{key}/{INDEX}"})
        index_rows.append([mdx.link(name, f"{key}/{INDEX}"), mdx.percent(data.get("accuracy")),
                           str(data.get("counts", {}).get("samples", "")), str(data.get("counts", {}).get("flagged", ""))])
    if not audits:
        return out
    out.add(AUDITS_INDEX, "# Audits\n\nBatch audits run with `xmllm run CONFIG.yaml`.\n\n"
            + mdx.table(["audit", "accuracy", "samples", "flagged"], index_rows) + "\n")
    out.nav[AUDITS_INDEX] = [{"Audits": [{"Overview": AUDITS_INDEX}, *entries]}]
    return out
