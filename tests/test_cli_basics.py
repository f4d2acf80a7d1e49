"""The ``xmllm`` entry point: version, help, and the explainer listing."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from importlib.metadata import version

import pytest

from xmllm.explainers.registry import registered
from xmllm.cli import build_parser, main


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"xmllm {version('xmllm')}"


def test_help_lists_every_subcommand(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert {"catalog", "explainers"} <= set(sub.choices)
    for name in sub.choices:
        assert name in out


def test_no_arguments_prints_help(capsys) -> None:
    assert main([]) == 0
    assert "usage: xmllm" in capsys.readouterr().out


def test_explainers_json_lists_every_registered_explainer(capsys) -> None:
    assert main(["explainers", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    ids = [r["id"] for r in rows]
    assert ids == sorted(registered()) and len(ids) == len(set(ids))
    for r in rows:
        cls = registered()[r["id"]]
        assert r["status"] == "implemented" and r["title"] == cls.title and r["scope"] == cls.scope
        assert r["group"] == cls.group


def test_every_explainer_id_is_prefixed_by_the_module_that_defines_it() -> None:
    """``gradient.saliency`` lives in ``xmllm.explainers.methods.gradient``: ids say where to look."""
    from xmllm.explainers.registry import BUILTIN_PACKAGE

    assert registered()
    for eid, cls in registered().items():
        group, _, name = eid.partition(".")
        assert name and cls.__module__ == f"{BUILTIN_PACKAGE}.{group}", (eid, cls.__module__)
        assert cls.group == group, (eid, cls.group)


def test_module_entry_point_runs() -> None:
    """``python -m xmllm.cli`` works in a fresh interpreter, as the console script does."""
    proc = subprocess.run(
        [sys.executable, "-m", "xmllm.cli", "catalog", "--json"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["leaves"]) == 16


def test_a_reader_that_goes_away_ends_the_command_quietly() -> None:
    """``xmllm catalog --json | head -c 1``: the reader closes the pipe before the command writes;
    the command stops with 141 (128 + SIGPIPE), as ``cat`` does, and no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "xmllm.cli", "catalog", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # long before the interpreter has started and the catalog is loaded
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141 and b"Traceback" not in err and b"BrokenPipe" not in err, err.decode()


def test_explainers_id_lists_the_declared_parameters(capsys) -> None:
    assert main(["explainers", "perturbation.occlusion"]) == 0
    out = capsys.readouterr().out
    specs = registered()["perturbation.occlusion"].Params.specs()
    for spec in specs:
        assert f"  {spec.name} = {json.dumps(spec.default)}  ({spec.type_text()})" in out
        assert spec.help in out
    assert main(["explainers", "perturbation.occlusion", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert [p["name"] for p in row["params"]] == [s.name for s in specs]
    assert main(["explainers", "nope.none"]) == 2
    assert capsys.readouterr().err.strip() == "xmllm: error: unknown explainer id 'nope.none'; run 'xmllm explainers' to list them"
