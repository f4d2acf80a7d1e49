"""One import package, ``xmllm``, mapped from the repository's folders: what the wheel holds,
and that a user's own modules named like our folders cannot shadow it."""
from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_every_package_folder_is_listed_and_mapped_under_xmllm() -> None:
    setuptools = _pyproject()["tool"]["setuptools"]
    mapping = setuptools["package-dir"]
    assert mapping == {"xmllm": "reports", "xmllm.catalog": "catalog", "xmllm.explainers": "explainers",
                       "xmllm.templates": "templates"}
    found = set()
    for name, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join([name, *rel]))
    assert set(setuptools["packages"]) == found
    assert all(p == "xmllm" or p.startswith("xmllm.") for p in setuptools["packages"])


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of the tracked files (pip builds in the source folder, which must stay clean)."""
    out, src = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("source") / "xmllm"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, tracked.decode().split("\0")):
        source, target = ROOT / rel, src / rel
        if not source.exists() and not source.is_symlink():  # deleted in the working tree
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(source.readlink())
        else:
            shutil.copyfile(source, target)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (found,) = out.glob("xmllm-*.whl")
    return found


def test_the_wheel_installs_one_top_level_package_with_its_data(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"xmllm"}
    for needed in ("xmllm/cli.py", "xmllm/catalog/taxonomy.yaml", "xmllm/templates/report.html.j2",
                   "xmllm/templates/mkdocs/main.html", "xmllm/site_source/mkdocs.yml",
                   "xmllm/site_source/site/index.md", "xmllm/site_source/site/assets/stylesheets/xmllm.css",
                   "xmllm/explainers/demo/weights/final/model.safetensors",
                   "xmllm/explainers/models/adapters/llava.py", "xmllm/examples/audit/demo.yaml"):
        assert needed in names, needed
    # what the MkDocs source folder holds in the checkout is what ships, nothing generated
    shipped = {n.removeprefix("xmllm/site_source/site/") for n in names if n.startswith("xmllm/site_source/site/")}
    tracked = subprocess.run(["git", "ls-files", "site"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert shipped == {t.removeprefix("site/") for t in tracked}
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "xmllm = xmllm.cli:main" in entry


def test_a_users_own_reports_and_templates_modules_do_not_shadow_xmllm(tmp_path: Path) -> None:
    """The old layout's failure: a ``templates/__init__.py`` in the working folder broke reports."""
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "__init__.py").write_text("raise ImportError('the user templates package')\n")
    (tmp_path / "reports.py").write_text("raise ImportError('the user reports module')\n")
    (tmp_path / "catalog.py").write_text("raise ImportError('the user catalog module')\n")
    code = ("from xmllm.report.render import environment; from xmllm.catalog import load_catalog; "
            "environment().get_template('report.html.j2'); print(len(load_catalog().leaves()))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "16"


def test_importing_xmllm_loads_neither_torch_nor_transformers() -> None:
    code = "import sys, xmllm, xmllm.cli; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
