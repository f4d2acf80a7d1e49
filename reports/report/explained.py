"""A run: one sample explained by several explainers, in memory or read back from its folder.

:func:`xmllm.explain` makes a :class:`Run`; :meth:`Run.save` writes what ``xmllm explain --out``
writes (arrays, manifest, input images, the report) and :func:`load_run` reads a folder back
without the model. Reports render from a run alone, so a cached run re-renders without loading
the model. Every failure while reading is a one-line :class:`XmllmError` that names the file.
"""
from __future__ import annotations

import html
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, Iterator

from PIL import Image

from xmllm.explainers.explanation import Explanation, Target

from xmllm.errors import XmllmError

MANIFEST = "manifest.json"
ARRAYS = "explanations.npz"
REPORT = "report.html"
"""A run folder's self-contained report."""
IMAGE_NAME = "image_{}.png"
"""File name of a run's ``k``-th input image inside its folder."""
INLINE_TEMPLATE = "inline.html.j2"
"""The light view a notebook shows inline (static maps, no scripts)."""
INLINE_HEIGHT = 760
"""Pixels of the frame a notebook shows a report in (it scrolls; drag its corner to resize)."""


@dataclass
class Run:
    """One explained sample: the answer with per-token probabilities, every explanation by
    explainer id, the provenance (the manifest: model and weights hash, parameters, seed, package
    versions, sample hash) and the input images.

    Example:

        run = xmllm.explain(model, "cat.png", "What colour is the cat?", ["relevancy.chefer"])
        run.answer["text"], run["relevancy.chefer"].maps["image.answer"].shape
    """

    manifest: dict[str, Any]
    explanations: list[Explanation]
    images: list[Image.Image] = field(default_factory=list)
    image_names: list[str] = field(default_factory=list)
    folder: Path | None = None
    """Where the run was saved or read from (None for a run only in memory)."""
    prepared: Any = field(default=None, repr=False)
    """The prepared sample when the run was computed in this process (None when read back)."""

    def __post_init__(self) -> None:
        for exp in self.explanations:
            exp.run = self

    @property
    def target(self) -> Target | None:
        """The answer being explained, from the first explanation that carries one."""
        for exp in self.explanations:
            if exp.target.tokens:
                return exp.target
        return self.explanations[0].target if self.explanations else None

    @property
    def answer(self) -> dict[str, Any]:
        """The explained answer: ``text``, ``tokens``, ``token_ids`` and ``probs`` (per token)."""
        return dict(self.manifest.get("answer") or {})

    @property
    def ids(self) -> list[str]:
        """The explainers of this run, in the order they ran."""
        return [exp.explainer for exp in self.explanations]

    def __getitem__(self, explainer_id: str) -> Explanation:
        for exp in self.explanations:
            if exp.explainer == explainer_id:
                return exp
        raise KeyError(f"{explainer_id!r} is not in this run; it holds {', '.join(self.ids) or 'nothing'}")

    def __contains__(self, explainer_id: object) -> bool:
        return explainer_id in self.ids

    def __iter__(self) -> Iterator[Explanation]:
        return iter(self.explanations)

    def __len__(self) -> int:
        return len(self.explanations)

    def save(self, folder: str | Path, report: bool = True) -> Path:
        """Write ``explanations.npz``, ``manifest.json``, the input images (``image_0.png``, ...) and,
        with ``report``, ``report.html`` into ``folder``; returns the folder. :func:`load_run` reads
        it back.

        The folder is written whole or not at all: built in a hidden sibling and renamed into place
        (an earlier run's folder there is replaced), so a full disk leaves no run without its report.
        A failure to write raises the system's ``OSError`` (``xmllm explain`` makes it one line)."""
        from xmllm.explainers.explanation import save_explanations
        from xmllm.files import atomic, write_dir

        folder = Path(folder)
        names = self.image_names or [IMAGE_NAME.format(k) for k in range(len(self.images))]
        extra = {k: v for k, v in self.manifest.items() if k != "explanations"}
        if names:
            extra["sample"] = {**extra.get("sample", {}), "images": list(names)}
        page = self.report_html() if report else None  # rendered before anything is written

        def fill(staged: Path) -> None:
            for name, image in zip(names, self.images):
                atomic(staged / name, lambda fh, img=image: img.save(fh, format="PNG"), binary=True)
            save_explanations(self.explanations, staged / ARRAYS, staged / MANIFEST, extra=extra)
            if page is not None:
                atomic(staged / REPORT, lambda fh: fh.write(page))

        write_dir(folder, fill)
        self.folder = folder
        return folder

    def report_html(self) -> str:
        """The self-contained interactive report (the same bytes for the same run)."""
        from .ids import stable_bokeh_ids
        from .render import render_run

        with stable_bokeh_ids(id_seed(self.manifest)):
            return render_run(self)

    def only(self, explainer_id: str) -> "Run":
        """This run with one explanation (what :meth:`Explanation._repr_html_` shows)."""
        exp = self[explainer_id]
        manifest = {**self.manifest, "explainers": [explainer_id]}
        if isinstance(manifest.get("params"), dict):
            manifest["params"] = {k: v for k, v in manifest["params"].items() if k == explainer_id}
        if isinstance(manifest.get("timings_seconds"), dict):
            manifest["timings_seconds"] = {k: v for k, v in manifest["timings_seconds"].items()
                                           if k in (explainer_id, "prepare")}
        if isinstance(manifest.get("faithfulness"), dict):
            faith = dict(manifest["faithfulness"])
            faith["explainers"] = {k: v for k, v in (faith.get("explainers") or {}).items() if k == explainer_id}
            manifest["faithfulness"] = faith
        view = Run(manifest, [exp], self.images, self.image_names, self.folder, self.prepared)
        exp.run = self  # the single view borrows it; the explanation still belongs to this run
        return view

    def inline_html(self) -> str:
        """The light page a notebook shows (:func:`render_inline`): static maps, the why panel and
        the answer's tokens, tens of kilobytes where the interactive report carries BokehJS."""
        return render_inline(self)

    def _repr_html_(self) -> str:
        """The light view, inline in a notebook: inside its own frame, sandboxed without scripts,
        so that two runs in one notebook share no element ids or styles and nothing is loaded
        from anywhere. ``show(interactive=True)`` shows the full report instead."""
        return inline_frame(self.inline_html(), self.manifest)

    def show(self, interactive: bool = False) -> None:
        """Show the run: in a notebook, the light view inline, or with ``interactive`` the full
        interactive report (its own frame, scripts allowed there only); elsewhere the report in
        the web browser (from a file in the cache folder, replaced when the same run is shown again)."""
        try:
            from IPython import get_ipython
            from IPython.display import display
        except ImportError:
            get_ipython = None
        if get_ipython is not None and get_ipython() is not None:
            markup = inline_frame(self.report_html(), self.manifest, scripts=True) if interactive else self._repr_html_()
            display({"text/html": markup}, raw=True)  # raw: IPython's HTML() warns about any <iframe>
            return
        import hashlib
        import webbrowser

        from xmllm.cache import default_cache_dir
        from xmllm.files import write_atomic

        page = self.report_html()
        path = default_cache_dir() / "shown" / f"{hashlib.sha256(page.encode()).hexdigest()[:16]}.html"
        write_atomic(path, page)
        print(f"report: {path}")
        webbrowser.open(path.as_uri())


def id_seed(manifest: dict) -> str:
    """What seeds a page's element ids: the run's sample, explainers and seed (not its timings or
    creation time, so that two audits of one sample render alike)."""
    sample = manifest.get("sample") if isinstance(manifest.get("sample"), dict) else {}
    return json.dumps({"sample": sample.get("sha256"), "explainers": manifest.get("explainers"),
                       "seed": manifest.get("seed")}, sort_keys=True, default=str)


def explanation_html(explanation: Explanation) -> str:
    """One explanation's light view inline in a notebook (its static maps, the answer's tokens),
    within its run when it has one: the
    ``explanation`` renderer of the ``xmllm.renderers`` entry points, which
    :meth:`Explanation._repr_html_` loads (the core does not import this layer)."""
    run = explanation.run if isinstance(explanation.run, Run) else None
    if run is None or not any(e is explanation for e in run.explanations):
        run = Run({"explainers": [explanation.explainer]}, [explanation])
    return run.only(explanation.explainer)._repr_html_()


def inline_frame(page: str, manifest: dict[str, Any], scripts: bool = False) -> str:
    """``page`` in a sandboxed ``<iframe srcdoc>``: no scripts at all (the light view), or with
    ``scripts`` (the interactive report) scripts in an opaque origin of their own."""
    question = (manifest.get("sample") or {}).get("question", "xmllm report")
    sandbox = "allow-scripts" if scripts else ""
    return (f'<iframe title="{html.escape(str(question)[:200], quote=True)}" sandbox="{sandbox}" '
            f'style="width:100%;height:{INLINE_HEIGHT}px;border:1px solid #ccc;resize:vertical" '
            f'srcdoc="{html.escape(page, quote=True)}"></iframe>')


def render_inline(run: Run) -> str:
    """The light view of ``run`` (``templates/inline.html.j2``): each view's static PNG (the same
    figure the report prints), the why panel, the per-token probabilities and the faithfulness
    curves; no BokehJS, whose inline copy makes the full report megabytes per notebook cell."""
    from markupsafe import Markup

    from xmllm.templates import read_template

    from .about import about
    from .faithfulness import block_for
    from .figures import SectionControls
    from .render import CSS, anchor_for, answer_tokens, environment
    from .summary import why_panel
    from .views import SCALE_NOTE, PageImages, plan

    manifest = run.manifest
    page = PageImages.build(run.images, manifest.get("layouts"))
    sections = []
    for exp in run.explanations:
        controls = SectionControls(exp.explainer)  # the views wire their figures to it; only the PNGs are kept
        outs = [view.render(controls, page) for view in plan(exp)]
        for out in outs:
            out.roots = []
            out.notes = [n for n in out.notes if n != SCALE_NOTE and not n.startswith("Click")]  # no interaction here
        warning = exp.meta.get("warning")
        sections.append({"id": exp.explainer, "anchor": anchor_for(exp.explainer), "title": about(exp.explainer).title,
                         "views": outs, "warning": warning if isinstance(warning, str) else None,
                         "faithfulness": block_for(manifest, exp.explainer)})
    sample = manifest.get("sample") or {}
    samples = [x for x in manifest.get("samples") or [] if isinstance(x, dict)]
    scope = "dataset" if manifest.get("scope") == "dataset" or (samples and not sample) else "sample"
    page = {
        "why": why_panel(run) if scope == "sample" else None,
        "anchor_for": anchor_for,
        "scope": scope,
        "samples_total": len(samples),
        "heading": sample.get("question", "") if scope == "sample" else
        f"{', '.join(e.explainer for e in run.explanations)} over {len(samples)} samples",
        "sample": sample,
        "expected": sample.get("expected"),
        "answer": answer_tokens(run.target, manifest),
        "images": [{"uri": src.data["url"][0], "size": size} for src, size in zip(page.sources, page.sizes)],
        "model": manifest.get("model") or {},
        "created": manifest.get("created"),
        "report_path": str(run.folder / REPORT) if run.folder is not None and (run.folder / REPORT).is_file() else None,
        "sections": sections,
        "css": Markup(read_template(CSS)),
    }
    return environment().get_template(INLINE_TEMPLATE).render(**page)


def load_run(folder: str | Path) -> Run:
    """Read ``folder``'s manifest, arrays and images (what :meth:`Run.save` and ``xmllm explain
    --out`` write) back into a :class:`Run`; a one-line error naming the bad file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise XmllmError(f"{folder}: not a run folder (expected a folder written by 'xmllm explain --out')")
    manifest_path, arrays_path = folder / MANIFEST, folder / ARRAYS
    for path in (manifest_path, arrays_path):
        if not path.is_file():
            raise XmllmError(f"{path}: missing; a run folder holds {MANIFEST} and {ARRAYS} ('xmllm explain --out')")
    manifest = _read_manifest(manifest_path)
    explanations = _read_explanations(manifest, manifest_path, arrays_path)
    names = _image_names(manifest, manifest_path)
    images = [_read_image(folder / name) for name in names]
    return Run(manifest, explanations, images, names, folder)


def render_report(run_dir: Path) -> str:
    """The HTML page of the run saved in ``run_dir``: the same bytes on every render of it."""
    return load_run(Path(run_dir)).report_html()


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Render ``run_dir``'s report and write it atomically to ``out`` (default
    ``run_dir/report.html``); returns the path written."""
    from xmllm.files import write_atomic

    out = Path(out) if out is not None else Path(run_dir) / REPORT
    write_atomic(out, render_report(run_dir))
    return out


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise XmllmError(f"{path}: cannot read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise XmllmError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("explanations"), list):
        raise XmllmError(f"{path}: field 'explanations' is missing or not a list")
    return manifest


def _read_explanations(manifest: dict[str, Any], manifest_path: Path, arrays_path: Path) -> list[Explanation]:
    import numpy as np

    out = []
    try:
        with np.load(arrays_path, allow_pickle=False) as data:
            for i, head in enumerate(manifest["explanations"]):
                where = f"{manifest_path}: explanations[{i}]"
                try:
                    eid = head["explainer"]
                    exp = Explanation(eid, dict(head.get("params") or {}), Target(**head["target"]),
                                      scores=dict(head.get("scores") or {}), meta=dict(head.get("meta") or {}))
                    axes = head["axes"]
                except (KeyError, TypeError) as exc:
                    raise XmllmError(f"{where}: malformed header ({type(exc).__name__}: {exc})") from None
                for name, names in axes.items():
                    key = f"{eid}/{name}"
                    if key not in data.files:
                        raise XmllmError(f"{arrays_path}: array {key!r} named in {manifest_path.name} is missing")
                    array = data[key]
                    if array.ndim != len(names):
                        raise XmllmError(f"{arrays_path}: array {key!r} has {array.ndim} dims but axes {names}")
                    exp.maps[name] = array
                    exp.axes[name] = tuple(names)
                out.append(exp)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise XmllmError(f"{arrays_path}: not a readable .npz archive ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    return out


def _image_names(manifest: dict[str, Any], manifest_path: Path) -> list[str]:
    names = (manifest.get("sample") or {}).get("images") or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise XmllmError(f"{manifest_path}: field sample.images must be a list of file names")
    for name in names:
        pure = PurePath(name)
        if pure.is_absolute() or len(pure.parts) != 1 or name in (".", ".."):
            raise XmllmError(f"{manifest_path}: sample.images entry {name!r} must be a file name inside the run folder")
    return names


def _read_image(path: Path) -> Image.Image:
    if not path.is_file():
        raise XmllmError(f"{path}: missing (listed in {MANIFEST} under sample.images)")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, Image.DecompressionBombError) as exc:
        raise XmllmError(f"{path}: not a readable image ({exc})") from None
