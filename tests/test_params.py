"""Parameter declarations: one validator for every explainer, the same one-line errors everywhere."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from xmllm.explainers.params import ExplainerParams, ParamError, param
from xmllm.explainers.registry import Explainer, RegistryError, register, registered


@dataclass(frozen=True)
class Sample(ExplainerParams):
    count: int = param(1, "how many", low=1)
    share: float = param(0.5, "a share in (0, 1]", low=0.0, low_open=True, high=1.0)
    mode: str = param("a", "which mode", choices=("a", "b"))
    flag: bool = param(True, "on or off")
    layers: tuple[int, ...] | None = param(None, "block indices")
    token: int | str | None = param(None, "an id or a token")
    windows: tuple[tuple[int, ...], ...] | None = param(None, "lists of blocks", low=0)
    inner: dict[str, Any] | None = param(None, "another explainer's parameters")
    sample: Any = param(None, "a Python object", cli=False)


def test_defaults_and_conversions() -> None:
    got = Sample.parse({"layers": [0, -1], "windows": [[0, 1], [2]], "share": 1, "token": 5}, "x.y")
    assert got.layers == (0, -1) and got.windows == ((0, 1), (2,)) and got.share == 1.0 and got.token == 5
    assert got.count == 1 and got.mode == "a" and got.flag is True
    assert Sample.parse({"token": "<unk>"}, "x.y").token == "<unk>"
    assert got.as_dict()["layers"] == [0, -1] and "sample" not in got.as_dict(cli_only=True)


@pytest.mark.parametrize("values, message", [
    ({"cont": 1}, "x.y: unknown parameter 'cont'; known: count, share, mode, flag, layers, token, windows, inner, sample"),
    ({"count": 0}, "x.y: parameter count=0 must be an integer >= 1"),
    ({"count": True}, "x.y: parameter count=True must be an integer >= 1"),
    ({"count": 1.5}, "x.y: parameter count=1.5 must be an integer >= 1"),
    ({"share": 0}, "x.y: parameter share=0 must be a number > 0 and <= 1"),
    ({"share": float("nan")}, "x.y: parameter share=nan must be a finite number > 0 and <= 1"),
    ({"mode": "c"}, "x.y: parameter mode='c' must be one of a, b"),
    ({"flag": "yes"}, "x.y: parameter flag='yes' must be true or false"),
    ({"layers": 3}, "x.y: parameter layers=3 must be a list of integers"),
    ({"layers": "0,1"}, "x.y: parameter layers='0,1' must be a list of integers"),
    ({"token": 1.5}, "x.y: parameter token=1.5 must be an integer or a string"),
    ({"windows": [[0, -1]]}, "x.y: parameter windows=[[0, -1]] must be a list of lists of integers >= 0"),
    ({"inner": [1]}, "x.y: parameter inner=[1] must be a mapping of names to values"),
    ({"count": None}, "x.y: parameter count=None must not be null"),
])
def test_bad_values_are_one_line_errors_naming_the_explainer(values, message) -> None:
    with pytest.raises(ParamError) as err:
        Sample.parse(values, "x.y")
    assert str(err.value) == message


def test_every_registered_explainer_declares_valid_parameters_with_help() -> None:
    for eid, cls in registered().items():
        specs = cls.Params.specs()
        assert len({s.name for s in specs}) == len(specs), eid
        for spec in specs:
            assert spec.help and "\n" not in spec.help, (eid, spec.name)
            assert spec.validate(spec.default, eid) == spec.default or spec.kind == "tuple", (eid, spec.name)
        with pytest.raises(ParamError, match=rf"^{eid}: unknown parameter 'not_a_parameter'"):
            cls.check_params({"not_a_parameter": 1})


def test_a_bad_declaration_is_refused_at_registration() -> None:
    class NoHelp(Explainer):
        id, title, group = "test.nohelp", "No help", "test"

        @dataclass(frozen=True)
        class Params(ExplainerParams):
            size: int = 3

    with pytest.raises(RegistryError, match="declare it with param"):
        register(NoHelp)

    class BadDefault(Explainer):
        id, title, group = "test.baddefault", "Bad default", "test"

        @dataclass(frozen=True)
        class Params(ExplainerParams):
            size: int = param(0, "a size", low=1)

    with pytest.raises(RegistryError, match="size=0 must be an integer >= 1"):
        register(BadDefault)

    class OldName(Explainer):
        id, title = "test.oldname", "Old name"
        family = "test"  # the group's name in xmllm 0.2

    with pytest.raises(RegistryError, match="^explainer class OldName sets 'family': rename it to 'group'"):
        register(OldName)
    assert not {"test.nohelp", "test.baddefault", "test.oldname"} & set(registered())
