"""Explainer parameters, declared once and validated in one place.

Every explainer declares its parameters as a frozen dataclass (``Params``, a subclass of
:class:`ExplainerParams`) whose fields are made with :func:`param`: the annotation gives the type,
:func:`param` the default, bounds or choices and a one-line help. The base class validates what
a caller passes against that declaration before any model work, so that every explainer answers
unknown names and bad values with the same one-line error, and the same declaration feeds
``xmllm explainers``, the explainer pages and the audit config's validation.

Supported types: ``int``, ``float``, ``bool``, ``str``, unions of those (``int | str``),
``tuple[T, ...]`` of those (lists are accepted and stored as tuples),
``tuple[tuple[int, ...], ...]``, ``dict[str, Any]`` (a JSON object, e.g. another explainer's
parameters), any of them ``| None``, and ``Any`` for Python objects that only the Python API can
pass (declare those with ``cli=False``).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from xmllm import XmllmError

PARAM_KEY = "xmllm.param"


class ParamError(XmllmError, ValueError):
    """An unknown parameter name or a value outside its declaration (one line)."""


@dataclass(frozen=True)
class ParamInfo:
    """What :func:`param` records on a field beside its default."""

    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[Any, ...] | None = None
    cli: bool = True


def param(default: Any, help: str, *, low: float | None = None, high: float | None = None,
          low_open: bool = False, high_open: bool = False, choices: Sequence[Any] | None = None,
          cli: bool = True) -> Any:
    """A declared parameter: its default, a one-line help, and optional bounds (inclusive unless
    ``low_open``/``high_open``; for a tuple they bound every item) or choices. ``cli=False`` marks
    a Python object (a sample, a model) that the command line and audit configs cannot give."""
    if not help or "\n" in help:
        raise ValueError("a parameter needs a one-line help")
    if isinstance(default, list):
        default = tuple(default)
    info = ParamInfo(help, low, high, low_open, high_open, tuple(choices) if choices is not None else None, cli)
    return dataclasses.field(default=default, metadata={PARAM_KEY: info})


@dataclass(frozen=True)
class Spec:
    """One parameter as the validator and the docs see it."""

    name: str
    kind: str
    """``int``, ``float``, ``bool``, ``str``, a union of those (``int|str``), ``object``, or ``tuple``."""
    item: str | None
    """For tuples: the item's kind (``int``, ``float``, ``str``, ``bool`` or ``tuple[int]``)."""
    optional: bool
    default: Any
    info: ParamInfo

    @property
    def help(self) -> str:
        return self.info.help

    def type_text(self) -> str:
        """The accepted values in words, e.g. ``integer >= 1, or null``."""
        if self.kind == "object":
            text = "a Python object (Python API only)"
        elif self.kind == "dict":
            text = "a mapping of names to values"
        elif self.kind == "tuple":
            text = self._list_text()
        elif self.info.choices is not None:
            text = "one of " + ", ".join(map(str, self.info.choices))
        else:
            text = " or ".join(_WORDS[k] for k in self.kind.split("|")) + _bounds_text(self.info)
        return text + (", or null" if self.optional else "")

    def describe(self) -> dict[str, Any]:
        """JSON record for ``xmllm explainers --json`` and the pages."""
        return {"name": self.name, "type": self.type_text(), "default": to_json(self.default), "help": self.help,
                "choices": list(self.info.choices) if self.info.choices is not None else None,
                "low": self.info.low, "high": self.info.high, "cli": self.info.cli}

    def validate(self, value: Any, owner: str) -> Any:
        """``value`` as the declared type (lists become tuples), or a :class:`ParamError`."""
        if value is None:
            if self.optional:
                return None
            self._fail(value, owner, "must not be null")
        if self.kind == "object":
            return value
        if self.kind == "dict":
            if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
                self._fail(value, owner, "must be a mapping of names to values")
            return dict(value)
        if self.kind == "tuple":
            if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
                self._fail(value, owner, f"must be a {self._list_text()}")
            try:
                return tuple(self._scalar(v, self.item or "str", owner) for v in value)
            except ParamError:
                self._fail(value, owner, f"must be a {self._list_text()}")
        return self._scalar(value, self.kind, owner)

    def _list_text(self) -> str:
        if self.info.choices is not None:
            return "list of items, each one of " + ", ".join(map(str, self.info.choices))
        return f"list of {_PLURAL[self.item or 'str']}" + _bounds_text(self.info)

    def _scalar(self, value: Any, kind: str, owner: str, whole: Any = None) -> Any:
        shown = value if whole is None else whole
        if "|" in kind:  # a union of scalars: the first that takes the value
            for alternative in kind.split("|"):
                try:
                    return self._scalar(value, alternative, owner, whole)
                except ParamError:
                    continue
            self._fail(shown, owner, "must be " + " or ".join(_ARTICLED[k] for k in kind.split("|")))
        if kind == "tuple[int]":
            if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
                self._fail(shown, owner, "must be a list of lists of integers")
            return tuple(self._scalar(v, "int", owner) for v in value)
        if kind == "bool":
            if not isinstance(value, (bool, np.bool_)):
                self._fail(shown, owner, "must be true or false")
            value = bool(value)
        elif kind == "int":
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
                self._fail(shown, owner, "must be an integer" + _bounds_text(self.info))
            value = int(value)
        elif kind == "float":
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)) \
                    or not math.isfinite(float(value)):
                self._fail(shown, owner, "must be a finite number" + _bounds_text(self.info))
            value = float(value)
        elif kind == "str":
            if not isinstance(value, str):
                self._fail(shown, owner, "must be a string")
        if self.info.choices is not None and value not in self.info.choices:
            self._fail(shown, owner, "must be one of " + ", ".join(map(str, self.info.choices)))
        if kind in ("int", "float") and not _in_bounds(value, self.info):
            self._fail(shown, owner, f"must be {'an integer' if kind == 'int' else 'a number'}" + _bounds_text(self.info))
        return value

    def _fail(self, value: Any, owner: str, why: str) -> typing.NoReturn:
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise ParamError(f"{owner}: parameter {self.name}={shown} {why}")


_WORDS = {"int": "integer", "float": "number", "bool": "true or false", "str": "string",
          "tuple[int]": "list of integer"}
_PLURAL = {"int": "integers", "float": "numbers", "bool": "true/false values", "str": "strings",
           "tuple[int]": "lists of integers"}
_ARTICLED = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def _in_bounds(value: float, info: ParamInfo) -> bool:
    if info.low is not None and (value <= info.low if info.low_open else value < info.low):
        return False
    if info.high is not None and (value >= info.high if info.high_open else value > info.high):
        return False
    return True


def _bounds_text(info: ParamInfo) -> str:
    parts = []
    if info.low is not None:
        parts.append(f"{'>' if info.low_open else '>='} {_num(info.low)}")
    if info.high is not None:
        parts.append(f"{'<' if info.high_open else '<='} {_num(info.high)}")
    return (" " + " and ".join(parts)) if parts else ""


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def to_json(value: Any) -> Any:
    """Tuples as lists, recursively (what a manifest records)."""
    if isinstance(value, (tuple, list)):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    return value


_SCALARS = {int: "int", float: "float", bool: "bool", str: "str"}


def _kind_of(hint: Any, where: str) -> tuple[str, str | None, bool]:
    """(kind, item kind, optional) of a type hint; a TypeError for an unsupported one."""
    optional = False
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        if len(args) > 1 and all(a in _SCALARS for a in args):
            return "|".join(_SCALARS[a] for a in args), None, optional
        if len(args) != 1:
            raise TypeError(f"{where}: unsupported parameter type {hint!r} (one type or scalars, optionally | None)")
        hint, origin = args[0], typing.get_origin(args[0])
    if hint is Any:  # anything, None included
        return "object", None, True
    if origin is dict and typing.get_args(hint)[:1] == (str,):
        return "dict", None, optional
    if hint in _SCALARS:
        return _SCALARS[hint], None, optional
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            inner = args[0]
            if inner in _SCALARS:
                return "tuple", _SCALARS[inner], optional
            if typing.get_origin(inner) is tuple and typing.get_args(inner) == (int, Ellipsis):
                return "tuple", "tuple[int]", optional
    raise TypeError(f"{where}: unsupported parameter type {hint!r}")


@dataclass(frozen=True)
class ExplainerParams:
    """Base of every explainer's ``Params``: a frozen dataclass of declared parameters."""

    owner: ClassVar[str] = "explainer"

    @classmethod
    def specs(cls) -> tuple[Spec, ...]:
        return _specs(cls)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(s.name for s in cls.specs())

    @classmethod
    def parse(cls, values: Mapping[str, Any] | None, owner: str) -> "ExplainerParams":
        """Validated parameters from ``values`` (defaults for the rest); a one-line
        :class:`ParamError` naming ``owner`` for an unknown name or a bad value."""
        values = dict(values or {})
        specs = {s.name: s for s in cls.specs()}
        unknown = sorted(set(values) - set(specs))
        if unknown:
            known = ", ".join(specs) or "none"
            raise ParamError(f"{owner}: unknown parameter {unknown[0]!r}; known: {known}")
        return cls(**{name: specs[name].validate(value, owner) for name, value in values.items()})

    def as_dict(self, cli_only: bool = False) -> dict[str, Any]:
        """The values as JSON-able data (tuples as lists); ``cli_only`` leaves Python objects out."""
        return {s.name: to_json(getattr(self, s.name)) for s in self.specs() if s.info.cli or not cli_only}


@lru_cache(maxsize=None)
def _specs(cls: type) -> tuple[Spec, ...]:
    if not (isinstance(cls, type) and issubclass(cls, ExplainerParams) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"{cls!r} must be a dataclass subclassing ExplainerParams")
    hints = typing.get_type_hints(cls)
    out = []
    own = set(cls.__dict__.get("__annotations__", {}))
    # the class's own parameters first, then those it inherits (a shared group such as MaskingParams)
    for f in sorted(dataclasses.fields(cls), key=lambda f: f.name not in own):
        info = f.metadata.get(PARAM_KEY)
        where = f"{cls.__qualname__}.{f.name}"
        if info is None:
            raise TypeError(f"{where}: declare it with param(default, help, ...)")
        kind, item, optional = _kind_of(hints[f.name], where)
        default = f.default
        if default is None and not optional:
            raise TypeError(f"{where}: a None default needs an optional type (T | None)")
        out.append(Spec(f.name, kind, item, optional, default, info))
    return tuple(out)


def check_declaration(cls: type) -> None:
    """Fail loudly at registration when a ``Params`` class is not a valid declaration."""
    params = getattr(cls, "Params", None)
    if params is None:
        return
    if not dataclasses.is_dataclass(params) or not params.__dataclass_params__.frozen:
        raise TypeError(f"{cls.__name__}.Params must be a frozen dataclass")
    specs = _specs(params)
    for spec in specs:  # the defaults themselves must pass the declaration
        spec.validate(spec.default, cls.__name__)


# --- value checks for arguments that are not declared parameters (metrics, toolkit calls) ----------


def positive_int(name: str, value: Any) -> int:
    """``value`` as an int >= 1, or a one-line :class:`ParamError` naming the parameter."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ParamError(f"parameter {name}={value!r} must be an integer >= 1")
    return int(value)


def an_int(name: str, value: Any) -> int:
    """``value`` as an int, or a one-line :class:`ParamError` naming the parameter."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ParamError(f"parameter {name}={value!r} must be an integer")
    return int(value)


def choice(name: str, value: Any, options: Sequence[str]) -> str:
    """``value`` if it is one of ``options``, or a one-line :class:`ParamError`."""
    if value not in options:
        raise ParamError(f"parameter {name}={value!r} must be one of {', '.join(options)}")
    return str(value)
