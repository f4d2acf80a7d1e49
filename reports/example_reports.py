"""The examples step of ``xmllm build``: one example run per explainer and its rendered report.

Its own module because both of the build's processes run it (:mod:`xmllm.second_process`).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

from xmllm.errors import XmllmError

from .cache import cache_key
from .site.pages import REPORTS, ExampleResult

RENDERER_PACKAGES = ("xmllm.report", "xmllm.templates")
"""Packages whose files key cached reports: edit a template and reports re-render."""


def _bar(total: int, desc: str, progress: bool, unit: str = "step"):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not progress, leave=True)


def renderer_fingerprint() -> str:
    """SHA-256 over the report renderer's and templates' files (path and bytes)."""
    from importlib.resources import files

    digest = hashlib.sha256()
    for package in RENDERER_PACKAGES:
        root = Path(str(files(package)))
        for path in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
            digest.update(f"{package}/{path.relative_to(root).as_posix()}".encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def example_ids(wanted: list[str] | None) -> list[str]:
    """Implemented explainers to make examples of (all by default), in registry order."""
    from xmllm.explainers.registry import RegistryError, get_explainer, registered

    if wanted is None:
        return list(registered())
    for eid in wanted:
        try:
            get_explainer(eid)
        except RegistryError as exc:
            raise XmllmError(f"--explainers: {exc}") from None
    return list(dict.fromkeys(wanted))


def build_examples(session: Any, ids: list[str], reports_root: Path, progress: bool,
                   failures: dict[str, str] | None = None,
                   skipped: dict[str, str] | None = None,
                   claim: Callable[[str], bool] | None = None,
                   handed_over: list[str] | None = None) -> dict[str, ExampleResult]:
    """One example run and report per explainer; reports go to ``reports_root/<id>.html``.

    An explainer whose example fails (a one-line error) is left out and its message put in
    ``failures``, so one broken explainer does not take the rest of the site down with it; one
    that has no example on this model (:class:`~xmllm.examples.ExampleSkipped`) goes to
    ``skipped`` with the reason. With ``claim``, an explainer whose claim fails (the second
    process took it) is left to it and listed in ``handed_over``.
    """
    from xmllm.explainers.registry import get_explainer

    from .examples import ExampleSkipped, builder_for
    from .report.explained import write_report
    from .session import ModelUnavailable

    renderer = renderer_fingerprint()
    out: dict[str, ExampleResult] = {}
    with _bar(len(ids), "examples", progress, "explainer") as bar:
        for eid in ids:
            if claim is not None and not claim(eid):
                if handed_over is not None:
                    handed_over.append(eid)
                bar.update(1)
                continue
            bar.set_postfix_str(eid)
            cls = get_explainer(eid)
            builder = builder_for(cls)
            if builder is None:
                bar.update(1)
                continue
            try:
                run = builder(session, cls)
            except ExampleSkipped as exc:
                if skipped is not None:
                    skipped[eid] = str(exc)
                bar.update(1)
                continue
            except (XmllmError, ValueError) as exc:
                if failures is None or isinstance(exc, ModelUnavailable):
                    raise
                failures[eid] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                bar.update(1)
                continue
            manifest = json.loads((run.run_dir / "manifest.json").read_text(encoding="utf-8"))
            report = None
            key = cache_key(session.weights, run.run_dir.name, "report", {"renderer": renderer})

            def render(folder: Path, run_dir: Path = run.run_dir) -> None:
                write_report(run_dir, folder / "report.html")

            try:
                folder = session.cache.get_or_build(key, render)
            except Exception as exc:  # a renderer bug: reported, and the other examples go on
                if failures is None:
                    raise
                failures[eid] = f"report: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            else:
                reports_root.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(folder / "report.html", reports_root / f"{eid}.html")
                report = f"{REPORTS}/{eid}.html"
            out[eid] = ExampleResult(eid, run.run_dir, report, manifest, run.cached)
            bar.update(1)
    return out
