"""The one run pipeline: a plan parses each explainer's parameters once and checks each refusal
once; a user's error is one line and exit 2, a bug inside an explainer keeps its traceback (exit 1)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import xmllm
from xmllm.explainers.demo.samples import generate_samples
from xmllm.explainers.params import ExplainerParams
from xmllm.explainers.registry import Explainer

ROOT = Path(__file__).resolve().parents[1]

BUGGY = textwrap.dedent('''
    """A throwaway explainer whose compute has a bug: it raises ValueError."""
    from xmllm.explainers.registry import Explainer, register


    @register
    class Buggy(Explainer):
        """Raises ValueError from inside compute, as a bug would."""

        id = "testing.buggy"
        title = "Buggy"
        group = "testing"

        def compute(self, model, sample, params):
            raise ValueError("an index went out of range inside the explainer")
''')


def _xmllm(code: str, tmp_path: Path, *args: str, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(pythonpath or ""), os.environ.get("PYTHONPATH", "")) if p)}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)


MAIN = "import sys; from xmllm.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> tuple[Path, str]:
    sample = generate_samples(1, seed=0, question_types=["colour"])[0]
    path = tmp_path_factory.mktemp("pipeline") / "sample.png"
    sample.image().save(path)
    return path, sample.text


def test_a_declared_user_error_is_one_line_and_exit_2(tmp_path, image) -> None:
    path, question = image
    got = _xmllm(MAIN, tmp_path, "explain", "--image", str(path), "--question", question, "--explainers",
                 "perturbation.occlusion", "--param", "perturbation.occlusion.window=0", "--out", str(tmp_path / "o"))
    assert got.returncode == 2, got.stderr[-2000:]
    assert got.stderr.strip() == ("xmllm: error: --param: perturbation.occlusion: parameter window=0 must be an "
                                  "integer >= 1"), got.stderr[-2000:]
    assert not (tmp_path / "o").exists()


def test_a_bug_inside_an_explainer_keeps_its_traceback_and_exits_1(tmp_path, image) -> None:
    """A ValueError from an explainer's compute is not a user error: the traceback shows where it
    was raised (the explainer's own module) and the exit status is 1, not 2."""
    path, question = image
    module = tmp_path / "plugins"
    module.mkdir()
    (module / "buggy_explainer.py").write_text(BUGGY, encoding="utf-8")
    got = _xmllm("import buggy_explainer; " + MAIN, tmp_path, "explain", "--image", str(path), "--question",
                 question, "--explainers", "testing.buggy", "--out", str(tmp_path / "o"), pythonpath=module)
    assert got.returncode == 1, got.stderr[-2000:]
    assert "Traceback (most recent call last)" in got.stderr
    assert "buggy_explainer.py" in got.stderr
    assert got.stderr.rstrip().endswith("ValueError: an index went out of range inside the explainer")
    assert "xmllm: error" not in got.stderr


def test_one_explain_parses_each_explainers_parameters_once_and_checks_each_refusal_once(monkeypatch, image) -> None:
    """A real run on the demo model, with ``ExplainerParams.parse`` and ``Explainer.refusal``
    wrapped to count their calls (each wrapper delegates to the original)."""
    path, question = image
    parses: list[str] = []
    refusals: list[str] = []
    parse, refusal = ExplainerParams.parse.__func__, Explainer.refusal

    def counted_parse(cls, values, owner):
        parses.append(owner)
        return parse(cls, values, owner)

    def counted_refusal(self, *args, **kwargs):
        refusals.append(self.id)
        return refusal(self, *args, **kwargs)

    monkeypatch.setattr(ExplainerParams, "parse", classmethod(counted_parse))
    monkeypatch.setattr(Explainer, "refusal", counted_refusal)
    ids = ["perturbation.occlusion", "gradient.saliency"]
    run = xmllm.explain("demo", path, question, ids, params={"perturbation.occlusion": {"window": 2}},
                        device="cpu", faithfulness=False)
    assert run.ids == ids
    assert sorted(parses) == sorted(ids)
    assert sorted(refusals) == sorted(ids)
    assert run.manifest["params"]["perturbation.occlusion"]["window"] == 2
