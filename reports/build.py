"""``xmllm build``: example reports, the case study and the catalog pages, then the MkDocs site.

Steps, each with a progress bar:

1. one example run per implemented explainer (a builder from :mod:`xmllm.examples` picked by
   id or scope) and its self-contained HTML report (:func:`xmllm.report.explained.write_report`);
2. the MMVP-style case study (:mod:`xmllm.casestudy`), in a second process beside step 1 when it
   is not cached whole and there are two CPUs (:mod:`xmllm.second_process`);
3. the generated pages (:mod:`xmllm.site`): taxonomy, explainers, gallery, case study, and the
   "Which explainer to trust" page of ``--evaluation`` (:func:`trust_page`);
4. ``mkdocs build`` through MkDocs' Python API into the output folder.

Model results are cached (:mod:`xmllm.cache`) by weights hash, sample hash, explainer and
parameters; reports by their run and the renderer's source. A second build with nothing changed
loads no model and takes a fraction of the first.

The MkDocs project is staged in the cache folder (:func:`stage_project`): the hand-written pages of
the config's ``docs_dir`` (``site/``, shipped in the package as ``xmllm/site_source/``), the
generated pages under ``generated/`` and the reports under ``reports/``, with a copy of the config
that points there. Nothing is written into the checkout or the installed package: only under
``--out`` and the cache folder. The site goes to a temporary folder beside ``--out`` and replaces
it only when MkDocs succeeds.

Trust page: the ``evaluation.json`` given as ``--evaluation`` (written by ``xmllm evaluate``) is
rendered by :func:`xmllm.evaluation.page.write_trust_page` into ``generated/``. The nav slot
``generated/trust.md`` of mkdocs.yml shows once that page exists, and is dropped otherwise.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from xmllm.errors import XmllmError
from xmllm.files import remove_stale, replace_dir, scratch_dir, write_atomic

from .cache import RunCache, cache_key, default_cache_dir
from .example_reports import build_examples, example_ids
from .site.pages import GENERATED, REPORTS, ExampleResult, SiteOutput

DEFAULT_OUT = Path("public")
SITE_SOURCE = "site_source"
"""Folder of the package holding ``mkdocs.yml`` and ``site/`` (links to the checkout's in a source tree)."""
THEME_OVERRIDES = "mkdocs"
"""Folder of :mod:`xmllm.templates` with the theme's template overrides (``custom_dir``)."""
TRUST_PAGE = f"{GENERATED}/trust.md"
AUDITS_NAV = f"{GENERATED}/audits/index.md"
"""Nav key of the audits' section (``xmllm build --audit DIR``); see :func:`xmllm.audit.site.site_pages`."""
SCRATCH = "scratch"
"""Folder of the cache holding each build's staged MkDocs project while it runs."""
STAGING_PREFIX = "site-"
BUILD_MARKER = ".xmllm-site"
"""Written into every built site: only a folder holding it (or an empty one) is replaced by a build."""
SECOND_PROCESS_STEP = "second process"
"""The closing line's name for the seconds of the second process (the case study, then examples)."""



def default_config() -> Path:
    """The packaged MkDocs config (the checkout's ``mkdocs.yml`` in an editable install)."""
    from importlib.resources import files

    return Path(str(files("xmllm") / SITE_SOURCE / "mkdocs.yml"))


def packaged_theme_overrides() -> Path:
    from importlib.resources import files

    return Path(str(files("xmllm.templates") / THEME_OVERRIDES))


@dataclass
class BuildOptions:
    out: Path = DEFAULT_OUT
    config: Path | None = None
    """An MkDocs config whose settings and hand-written pages to use (default: the packaged one)."""
    model: str = "demo"
    pairs: int = 100
    seed: int | None = None
    cache: Path = field(default_factory=default_cache_dir)
    use_cache: bool = True
    explainers: list[str] | None = None
    """Explainer ids to make examples of; None: every implemented one."""
    quick: bool = False
    """No model at all: catalog, explainer and static pages only."""
    device: str = "auto"
    progress: bool = True
    catalog: Path | None = None
    """Catalog file the taxonomy pages come from (default: the packaged one)."""
    evaluation: Path | None = None
    """An ``evaluation.json`` of ``xmllm evaluate``, rendered as the "Which explainer to trust" page."""
    audits: list[Path] = field(default_factory=list)
    """Output folders of ``xmllm run`` whose ``site/`` pages join the site under "Audits" (:mod:`xmllm.audit.site`)."""


@dataclass
class BuildSummary:
    out: Path
    seconds: float
    pages: int
    examples: int
    cache_hits: int
    cache_misses: int
    model_loaded: bool
    steps: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    case_study: dict[str, Any] | None = None
    failures: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    """Explainers with no example on this model, and why."""
    mkdocs_skipped: bool = False
    """True when the pages, config and theme were byte-identical to the last build's into ``out``."""


# --- helpers ---------------------------------------------------------------------------------------


def _bar(total: int, desc: str, progress: bool, unit: str = "step"):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not progress, leave=True)


def _out_prefix(out: Path) -> str:
    """Name prefix of the folder a site is built in beside ``out`` before it takes its place."""
    return f".{out.name}.building-"


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / BUILD_MARKER).is_file())):
        raise XmllmError(f"--out {out}: exists and is not a site built by xmllm (no {BUILD_MARKER}); "
                         "choose an empty or new folder")


def load_mkdocs_config(path: Path, site_dir: Path | None = None):
    from mkdocs.config import load_config
    from mkdocs.exceptions import ConfigurationError

    if not path.is_file():
        raise XmllmError(f"--config {path}: no such file")
    try:
        kwargs = {"site_dir": str(site_dir)} if site_dir is not None else {}
        return load_config(config_file=str(path), **kwargs)
    except ConfigurationError as exc:
        raise XmllmError(f"{path}: {str(exc).splitlines()[0]}") from None


@dataclass
class StagedProject:
    """A standalone MkDocs project in a scratch folder: ``docs/`` and ``mkdocs.yml``."""

    root: Path
    source_config: Path
    source_docs: Path
    theme_dir: Path | None

    @property
    def docs(self) -> Path:
        return self.root / "docs"

    @property
    def config(self) -> Path:
        return self.root / "mkdocs.yml"


def read_site_config(path: Path) -> dict[str, Any]:
    """An MkDocs config as plain data, read safely (no Python tags)."""
    from xmllm.safe_yaml import load_yaml

    data = load_yaml(path, what="--config")
    if not isinstance(data, dict):
        raise XmllmError(f"--config {path}: expected a mapping of MkDocs settings")
    return data


def package_tree(root: Path) -> Path:
    """A folder in which ``xmllm`` is one tree of source files, for mkdocstrings' static reading.

    A wheel installs the package as one folder already. An editable install maps
    ``xmllm.explainers``, ``xmllm.catalog`` and ``xmllm.templates`` from folders of their own
    (``package-dir``), which only the import system follows; there a tree of links is made under
    ``root``: ``xmllm/`` links every entry of the package's own folder plus those subpackages."""
    import importlib.util

    import xmllm

    top = Path(xmllm.__file__).resolve().parent
    outside = {}
    for sub in ("explainers", "catalog", "templates"):
        spec = importlib.util.find_spec(f"xmllm.{sub}")
        location = Path(next(iter(spec.submodule_search_locations))).resolve() if spec else None
        if location is not None and location != top / sub:
            outside[sub] = location
    if not outside:
        return top.parent
    tree = root / "xmllm"
    tree.mkdir(parents=True)
    for entry in top.iterdir():
        if entry.name not in outside and entry.name != "__pycache__":
            (tree / entry.name).symlink_to(entry)
    for sub, location in outside.items():
        (tree / sub).symlink_to(location)
    return root


def _point_mkdocstrings_at_package(raw: dict[str, Any], root: Path) -> None:
    """Give the config's mkdocstrings Python handler the package's source tree (if it has one)."""
    plugins = raw.get("plugins")
    if not isinstance(plugins, list):
        return
    for k, entry in enumerate(plugins):
        name, options = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()), (None, {}))
        if name != "mkdocstrings":
            continue
        options = dict(options or {})
        handlers = dict(options.get("handlers") or {})
        python = dict(handlers.get("python") or {})
        python["paths"] = [str(package_tree(root / "package"))]
        handlers["python"] = python
        options["handlers"] = handlers
        plugins[k] = {name: options}


def stage_project(config: Path, root: Path) -> StagedProject:
    """Copy ``config``'s hand-written pages into ``root/docs`` (leaving out the build's own
    ``generated/`` and ``reports/`` and dot-files) and write ``root/mkdocs.yml``: the same settings
    with ``docs_dir`` pointing there and the theme's ``custom_dir`` made absolute (the config's own
    folder when it exists beside the config, else the package's theme overrides)."""
    config = config.resolve()
    if not config.is_file():
        raise XmllmError(f"--config {config}: no such file")
    raw = read_site_config(config)
    source_docs = config.parent / str(raw.get("docs_dir", "docs"))
    if not source_docs.is_dir():
        raise XmllmError(f"--config {config}: docs_dir {raw.get('docs_dir', 'docs')!r} is not a folder beside it")
    theme = raw.get("theme")
    theme = {"name": theme} if isinstance(theme, str) else dict(theme or {})
    theme_dir = None
    if "custom_dir" in theme:
        own = config.parent / str(theme["custom_dir"])
        theme_dir = own if own.is_dir() else packaged_theme_overrides()
        theme["custom_dir"] = str(theme_dir)
    root.mkdir(parents=True, exist_ok=True)
    skip = shutil.ignore_patterns(".*", "__pycache__")
    shutil.copytree(source_docs, root / "docs", ignore=lambda folder, names: [
        *skip(folder, names), *([GENERATED, REPORTS] if Path(folder) == source_docs else [])])
    staged = StagedProject(root, config, source_docs, theme_dir)
    raw.update(docs_dir=str(staged.docs), theme=theme)
    _point_mkdocstrings_at_package(raw, root)
    raw.pop("site_dir", None)
    import yaml

    staged.config.write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return staged


def expand_nav(nav: list[Any], sections: Mapping[str, list[Any]], exists: Callable[[str], bool]) -> list[Any]:
    """The configured nav with generated sections put in and missing generated pages dropped.

    An entry pointing at a key of ``sections`` becomes a section of that title holding the
    section's entries; an entry pointing at a page under ``generated/`` that was not written is
    dropped (the trust page before its module exists).
    """
    out: list[Any] = []
    for item in nav:
        title, target = (None, item) if isinstance(item, str) else next(iter(item.items()))
        if isinstance(target, list):
            children = expand_nav(target, sections, exists)
            if children:
                out.append({title: children} if title else children)
            continue
        if target in sections:
            out.append({title or target: sections[target]})
        elif target.startswith(f"{GENERATED}/") and not exists(target):
            continue
        else:
            out.append(item)
    return out


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage().splitlines()[0])


def run_mkdocs(config_path: Path, site_dir: Path, sections: Mapping[str, list[Any]]) -> list[str]:
    """``mkdocs build`` into ``site_dir`` with the nav expanded; returns MkDocs' warnings."""
    from mkdocs.commands.build import build
    from mkdocs.exceptions import MkDocsException

    cfg = load_mkdocs_config(config_path, site_dir)
    docs = Path(cfg["docs_dir"])
    if cfg["nav"]:
        placed = json.dumps(cfg["nav"])
        cfg["nav"] = expand_nav(cfg["nav"], sections, lambda p: (docs / p).is_file())
        if AUDITS_NAV in sections and AUDITS_NAV not in placed:  # audit hook: appended when mkdocs.yml has no slot
            cfg["nav"] = [*cfg["nav"], *sections[AUDITS_NAV]]
    handler = _Warnings()
    logger = logging.getLogger("mkdocs")
    logger.addHandler(handler)
    try:
        cfg.plugins.on_startup(command="build", dirty=False)
        try:
            build(cfg)
        finally:
            cfg.plugins.on_shutdown()
    except MkDocsException as exc:
        raise XmllmError(f"mkdocs build failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    finally:
        logger.removeHandler(handler)
    return handler.messages


def site_inputs_digest(config_path: Path, docs: Path, nav: Mapping[str, list[Any]], theme_dir: Path | None) -> str:
    """SHA-256 over everything ``mkdocs build`` reads: the config, the theme's custom folder,
    every file of the docs folder, the generated nav, and MkDocs' and material's versions."""
    from importlib.metadata import version

    from .cache import canonical_json, xmllm_version

    digest = hashlib.sha256()
    digest.update(canonical_json({"nav": nav, "mkdocs": version("mkdocs"), "material": version("mkdocs-material"),
                                  "xmllm": xmllm_version()}).encode("utf-8"))
    roots = [(theme_dir, "theme"), (docs, "docs")] if theme_dir else [(docs, "docs")]
    digest.update(b"config\0" + config_path.read_bytes())
    for root, label in roots:
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root)
            if path.is_file() and not any(part.startswith(".") for part in rel.parts):
                digest.update(f"\0{label}/{rel.as_posix()}\0".encode() + path.read_bytes())
    return digest.hexdigest()


def _read_marker(out: Path) -> dict[str, Any]:
    try:
        data = json.loads((out / BUILD_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and (out / "index.html").is_file() else {}


def write_tree(root: Path, pages: list[Any]) -> None:
    for page in pages:
        path = root / page.path
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(page.content, bytes):
            path.write_bytes(page.content)
        else:
            path.write_text(page.content, encoding="utf-8")


# --- steps -----------------------------------------------------------------------------------------


def trust_page(staged: Path, evaluation: Path) -> None:
    """Render ``evaluation`` (an ``evaluation.json`` of ``xmllm evaluate``) as the "Which explainer
    to trust" page into ``staged/generated/``."""
    from .evaluation.page import write_trust_page

    if not Path(evaluation).is_file():
        raise XmllmError(f"--evaluation {evaluation}: no such file (write one with 'xmllm evaluate --out DIR')")
    write_trust_page(Path(evaluation), staged)


def plot_svg(cache: RunCache, study: dict[str, Any]) -> bytes:
    """The case study's plot, cached by the study's content (matplotlib is slow to import)."""
    from .cache import canonical_json

    digest = hashlib.sha256(canonical_json(study).encode("utf-8")).hexdigest()

    def draw(folder: Path) -> None:
        from .casestudy import plot

        plot(study, folder / "plot.svg")

    return (cache.get_or_build(cache_key("-", digest, "casestudy.plot"), draw) / "plot.svg").read_bytes()


def _sample_png(examples: dict[str, ExampleResult]) -> bytes | None:
    for ex in examples.values():
        for name in ex.manifest.get("sample", {}).get("images", []) or []:
            path = ex.run_dir / name
            if path.is_file():
                return path.read_bytes()
    return None


@dataclass
class _Clock:
    steps: dict[str, float] = field(default_factory=dict)

    def __call__(self, name: str) -> "_Step":
        return _Step(self, name)


class _Step:
    def __init__(self, clock: _Clock, name: str) -> None:
        self.clock, self.name = clock, name

    def __enter__(self) -> None:
        self.t = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        self.clock.steps[self.name] = round(time.perf_counter() - self.t, 3)


def build_site(opts: BuildOptions) -> BuildSummary:
    """Everything ``xmllm build`` does; see the module docstring."""
    t0 = time.perf_counter()  # the closing line counts the imports (torch's among them) too
    clock = _Clock()
    from xmllm.catalog import load_catalog

    from .casestudy import DEFAULT_SEED, CaseStudyConfig
    from .second_process import CLAIMS_PREFIX, MODEL_THREADS, StudyRun
    from .session import ModelSession
    from .site import casestudy as casestudy_page
    from .site import explainers as explainer_pages
    from .site import gallery, notebook, taxonomy

    clock.steps["start-up"] = round(time.perf_counter() - t0, 3)
    out = Path(opts.out).resolve()
    config_path = Path(opts.config) if opts.config is not None else default_config()
    if opts.pairs < 1:
        raise XmllmError(f"--pairs must be a positive integer, got {opts.pairs}")
    _check_out(out)
    ids = [] if opts.quick else example_ids(opts.explainers)
    cat = load_catalog(opts.catalog)  # a bad file raises CatalogError, a one-line XmllmError

    cache = RunCache(opts.cache, enabled=opts.use_cache)
    session = ModelSession(opts.model, cache, device=opts.device, threads=MODEL_THREADS)
    scratch = cache.root / SCRATCH
    remove_stale(scratch, STAGING_PREFIX)
    remove_stale(scratch, CLAIMS_PREFIX)
    staged = stage_project(config_path, scratch_dir(scratch, STAGING_PREFIX))
    study_run = None
    try:
        examples: dict[str, ExampleResult] = {}
        failures: dict[str, str] = {}
        skipped: dict[str, str] = {}
        study = None
        if not opts.quick:  # beside the examples where it is not cached whole (second_process)
            seed = DEFAULT_SEED if opts.seed is None else opts.seed
            study_run = StudyRun.start(session, CaseStudyConfig(pairs=opts.pairs, seed=seed), beside=bool(ids),
                                       examples=ids, scratch=scratch)
        handed_over: list[str] = []
        with clock("examples"):
            if ids:
                examples = build_examples(session, ids, staged.docs / REPORTS, opts.progress, failures, skipped,
                                          claim=study_run.claim if study_run is not None else None,
                                          handed_over=handed_over)
        with clock("case study"):
            if study_run is not None:
                study = study_run.result(opts.progress)
            if handed_over:  # made by the second process: read from the cache
                examples.update(build_examples(session, handed_over, staged.docs / REPORTS, False, failures, skipped))
                examples = {eid: examples[eid] for eid in ids if eid in examples}
        if study_run is not None and study_run.in_second_process:  # its own time, and the wait for it
            waited = clock.steps.pop("case study")
            clock.steps[SECOND_PROCESS_STEP] = round(study_run.seconds or 0.0, 3)
            clock.steps["waiting for it"] = waited
        with clock("pages"):
            site = SiteOutput()
            titles = explainer_pages.titles()
            site.extend(taxonomy.generate(examples, titles, catalog=cat))
            notes = {**{k: f"no example on this model: {v}" for k, v in skipped.items()},
                     **{k: f"the example failed in this build: {v}" for k, v in failures.items()}}
            site.extend(explainer_pages.generate(examples, catalog=cat, notes=notes))
            site.extend(gallery.generate(examples, titles, _sample_png(examples), quick=opts.quick))
            site.extend(notebook.generate(staged.docs))
            if study is not None:
                site.extend(casestudy_page.generate(study, plot_svg(session.cache, study)))
            else:
                site.add(casestudy_page.CASESTUDY_PAGE, "# Case study\n\nNot computed in a quick build "
                         "(`xmllm build --quick` runs no model). Run `xmllm build` for the numbers.\n")
            if opts.evaluation is not None:
                trust_page(staged.docs, opts.evaluation)
            if opts.audits:
                from .audit.site import site_pages as audit_pages

                site.extend(audit_pages(list(opts.audits)))
            write_tree(staged.docs, site.pages)

        with clock("mkdocs"):
            digest = site_inputs_digest(staged.source_config, staged.docs, site.nav, staged.theme_dir)
            previous = _read_marker(out)
            mkdocs_skipped = opts.use_cache and previous.get("inputs") == digest
            if mkdocs_skipped:  # the same pages, config and theme: the built site is already what MkDocs would write
                warnings = list(previous.get("warnings", []))
            else:
                remove_stale(out.parent, _out_prefix(out))
                tmp_out = scratch_dir(out.parent, _out_prefix(out))
                try:
                    warnings = run_mkdocs(staged.config, tmp_out, site.nav)
                    marker = {"built_by": "xmllm build", "inputs": digest, "warnings": warnings}
                    write_atomic(tmp_out / BUILD_MARKER, json.dumps(marker, indent=1) + "\n")
                    replace_dir(tmp_out, out)
                except BaseException:
                    shutil.rmtree(tmp_out, ignore_errors=True)
                    raise
    finally:
        if study_run is not None:
            study_run.close()
        session.close()
        shutil.rmtree(staged.root, ignore_errors=True)
    beside = study_run if study_run is not None and study_run.in_second_process else None
    return BuildSummary(
        out=out,
        seconds=time.perf_counter() - t0,
        pages=sum(p.path.endswith(".md") for p in site.pages),
        examples=len(examples),
        cache_hits=session.cache.hits + (beside.cache_hits if beside else 0),
        cache_misses=session.cache.misses + (beside.cache_misses if beside else 0),
        model_loaded=session.loaded_now or bool(beside and beside.model_loaded),
        steps=clock.steps,
        warnings=warnings,
        case_study=study["results"] if study else None,
        failures=failures,
        skipped=skipped,
        mkdocs_skipped=mkdocs_skipped,
    )

