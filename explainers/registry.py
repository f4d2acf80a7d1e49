"""Explainers are classes registered by id (Inseq-style); the catalog resolves ids here.

An explainer declares its metadata as class attributes (Quantus-style) and overrides one
entry point, ``explain`` (Captum-style). Registration happens at import of the module that
defines the class; :func:`load_builtin_explainers` imports every built-in module.
"""
from __future__ import annotations

import enum
import importlib
import pkgutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Mapping, Sequence

from .params import ExplainerParams, ParamError, check_declaration  # noqa: F401  (ParamError: re-exported)

if TYPE_CHECKING:  # pragma: no cover
    from xmllm.explainers.prepared import ExplainSample, Prepared
    from .explanation import Explanation
    from .models import LoadedModel
    from .scaleplan import ScalePlan

Scope = Literal["sample", "dataset"]


class Need(str, enum.Enum):
    """What an explainer requires from the model or the data, so callers can prepare it."""

    ATTENTION = "attention"  # eager attention weights
    GRADIENTS = "gradients"  # a backward pass through the model
    PAIR = "pair"  # a counterfactual partner sample
    LABELLED_SET = "labelled_set"  # a sample set with ground-truth attributes
    CHECKPOINTS = "checkpoints"  # two checkpoints of one model


@dataclass(frozen=True)
class Citation:
    """A paper an explainer implements or follows."""

    title: str
    year: int
    arxiv: str | None = None
    authors: str = ""


class Explainer:
    """Base class: subclasses set the metadata, declare :attr:`Params` and implement :meth:`compute`.

    :meth:`explain` is the one entry point (Captum's ``attribute``): it validates the keyword
    parameters against the declaration before any model work, makes the sample ready (the answer,
    the final sequence, the positions) and calls :meth:`compute` with both typed.
    """

    id: ClassVar[str]
    title: ClassVar[str]
    group: ClassVar[str]
    """The group of explainers it belongs to (``attention``, ``gradient``, ...): the module of
    :mod:`xmllm.explainers.methods` that holds it, for a built-in one."""
    scope: ClassVar[Scope] = "sample"
    needs: ClassVar[frozenset[Need]] = frozenset()
    citations: ClassVar[tuple[Citation, ...]] = ()
    summary: ClassVar[str] = ""
    Params: ClassVar[type[ExplainerParams]] = ExplainerParams
    """The declared parameters (a frozen dataclass of :func:`~xmllm.explainers.params.param` fields)."""
    model_needs: ClassVar[frozenset[str]] = frozenset()
    """What it needs from the model family beyond a forward pass (names of
    :data:`~xmllm.explainers.models.adapters.base.CAPABILITIES`); ``Need.ATTENTION`` implies
    ``decoder_attention``. A family that lacks one gets a declared refusal with the adapter's reason."""
    cross_attention_ready: ClassVar[bool] = False
    """Whether it runs where a family's image enters the decoder through cross-attention (Mllama),
    reading that cross-attention or leaving out what would need image positions in the decoder's
    sequence, instead of refusing for want of them."""
    supports_contrast: ClassVar[bool] = False
    """Whether it explains a contrast (``answer rather than foil``) through ``Prepared.target_ids``."""

    # What the application layer reads about an explainer, declared here so that the report, the
    # evaluation and the bench keep no table of explainers (see docs: adding an explainer).
    noise_hint: ClassVar[str] = ""
    """What to change when its image map's largest value is near numerical noise (the report's why
    panel names it); empty: the generic hint."""
    ranks_cells: ClassVar[bool] = True
    """Whether its image map ranks cells. False for a 0/1 set: it is left out of the why panel's
    agreement matrix and noise hints, and of the default evaluation (no ranking for the curves)."""
    evaluation_params: ClassVar[Mapping[str, Any]] = {}
    """Parameters ``xmllm evaluate`` uses instead of the defaults (cheaper where the scored map does
    not change); the user's ``--param`` overrides them."""
    evaluated_by_default: ClassVar[str] = ""
    """Empty: ``xmllm evaluate`` scores it when no explainers are named. Otherwise why it is left out."""

    @classmethod
    def why(cls, explanation: "Explanation") -> str | None:
        """A sentence for the report's why panel that says what this explanation found (the minimal
        causal set: "masking these 3 cells turns ..."), or None. Computed from the explanation alone."""
        return None

    @classmethod
    def scale_plan(cls, prep: "Prepared", full_layers: int) -> "ScalePlan":
        """How ``xmllm bench --scale`` measures it on ``prep`` (the bench's planning budget is active):
        by default as it is, with no parameter changed. Override where a cheaper value of a parameter
        leaves the peak memory as it is (fewer windows, steps, backward passes)."""
        from .scaleplan import ScalePlan

        return ScalePlan()

    @classmethod
    def check_params(cls, params: Mapping[str, Any] | None) -> ExplainerParams:
        """The validated parameters, or a one-line :class:`ParamError`; needs no model."""
        return cls.Params.parse(params, cls.id)

    def explain(self, model: "LoadedModel", sample: "ExplainSample | Prepared | Sequence[ExplainSample]",
                **params: Any) -> "Explanation":
        """Explain ``sample`` (one sample, or a sample set for ``scope == "dataset"``) on ``model``."""
        from xmllm import MissingInput

        checked = self.check_params(params)
        why = self.refusal(model, getattr(sample, "sample", sample), checked,
                           getattr(sample, "contrast", None) is not None)
        if why is not None:
            raise MissingInput(f"{self.id}: {why}")
        return self.compute(model, self.ready(model, sample), checked)

    def refusal(self, model: "LoadedModel", sample: Any, params: Any, contrast: bool = False) -> str | None:
        """Why this explainer will not run on ``sample`` (its :meth:`unmet` inputs, or a contrast it
        cannot explain), or None: the one rule :meth:`explain` and a run's planning both apply."""
        why = self.unmet_by_model(model)
        if why is None:
            why = self.unmet(model, sample, params)
        if why is None and contrast and not self.supports_contrast:
            why = "explains one answer, not a contrast between two (gradient, relevancy and perturbation ones do)"
        return why

    @classmethod
    def capabilities_needed(cls, reads_image_through: str = "sequence") -> frozenset[str]:
        """:attr:`model_needs`, with what its :attr:`needs` imply, on a family whose decoder reads the
        image through ``reads_image_through`` (an adapter's ``reads_image_through``): where that is
        cross-attention and the explainer runs there (:attr:`cross_attention_ready`), the decoder's
        self-attention need not reach the image."""
        implied = {"decoder_attention"} if Need.ATTENTION in cls.needs else set()
        needed = frozenset(cls.model_needs) | implied
        if reads_image_through == "cross_attention" and cls.cross_attention_ready:
            needed = needed - {"decoder_attention", "image_tokens"}
        return needed

    def unmet_by_model(self, model: "LoadedModel") -> str | None:
        """Why the model's family cannot give what this explainer needs (its adapter's reason), or None."""
        adapter = getattr(model, "adapter", None)
        if adapter is None or not hasattr(adapter, "lacks"):
            return None
        for capability in sorted(self.capabilities_needed(getattr(adapter, "reads_image_through", "sequence"))):
            why = adapter.lacks(capability)
            if why is not None:
                return f"{adapter.model_type}: {why}"
        return None

    def unmet(self, model: "LoadedModel", sample: Any, params: Any) -> str | None:
        """Why this explainer cannot run on ``sample`` (no ground truth, no second checkpoint, ...),
        or None. Checked before any model work: a run of several explainers lists it as skipped
        with this reason and runs the others; asked for alone, it is a one-line error."""
        return None

    def ready(self, model: "LoadedModel", sample: Any) -> Any:
        """The sample as :meth:`compute` takes it: for one sample, prepared on ``model`` (answer,
        final sequence, positions); a sample set as it is."""
        if self.scope != "sample":
            return sample
        from xmllm.explainers.prepared import as_prepared

        return as_prepared(model, sample)

    def compute(self, model: "LoadedModel", sample: Any, params: Any) -> "Explanation":  # pragma: no cover
        raise NotImplementedError(f"{type(self).__name__} does not implement compute()")


_REGISTRY: dict[str, type[Explainer]] = {}

BUILTIN_PACKAGE = "xmllm.explainers.methods"
"""Every module in this package defines built-in explainers (discovered, not listed)."""


class RegistryError(ValueError):
    """A registration or look-up that cannot be honoured."""


def register(cls: type[Explainer]) -> type[Explainer]:
    """Class decorator: add ``cls`` to the registry under ``cls.id``."""
    if not hasattr(cls, "group") and hasattr(cls, "family"):  # its old name (xmllm 0.2)
        raise RegistryError(f"explainer class {cls.__name__} sets 'family': rename it to 'group' "
                            "(the group of explainers it belongs to)")
    for attr in ("id", "title", "group"):
        if not isinstance(getattr(cls, attr, None), str) or not getattr(cls, attr):
            raise RegistryError(f"explainer class {cls.__name__} must set a non-empty {attr!r}")
    if cls.scope not in ("sample", "dataset"):
        raise RegistryError(f"explainer {cls.id}: scope must be 'sample' or 'dataset', not {cls.scope!r}")
    try:
        check_declaration(cls)
    except (TypeError, ValueError) as exc:
        raise RegistryError(f"explainer {cls.id}: {exc}") from None
    existing = _REGISTRY.get(cls.id)
    if existing is not None and existing is not cls:
        raise RegistryError(f"explainer id {cls.id!r} is already registered by {existing.__name__}")
    _REGISTRY[cls.id] = cls
    return cls


_LOADED = False


def load_builtin_explainers() -> None:
    """Import every built-in explainer module so that their classes register (once)."""
    global _LOADED
    if _LOADED:
        return
    package = importlib.import_module(BUILTIN_PACKAGE)
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        importlib.import_module(f"{BUILTIN_PACKAGE}.{info.name}")
    _LOADED = True


def registered() -> dict[str, type[Explainer]]:
    """All registered explainers, built-ins included, by id."""
    load_builtin_explainers()
    return dict(sorted(_REGISTRY.items()))


def sample_level_ids() -> list[str]:
    """Ids of the explainers that explain one sample (not a sample set), sorted."""
    return [eid for eid, cls in registered().items() if cls.scope == "sample"]


def get_explainer(explainer_id: str) -> type[Explainer]:
    """The class registered under ``explainer_id``; a one-line error otherwise."""
    table = registered()
    if explainer_id in table:
        return table[explainer_id]
    raise RegistryError(f"unknown explainer id {explainer_id!r}; run 'xmllm explainers' to list them")


def status(explainer_id: str) -> Literal["implemented", "unknown"]:
    """Whether an id is registered (implemented) or unknown."""
    return "implemented" if explainer_id in registered() else "unknown"


def describe_all() -> list[dict[str, Any]]:
    """One record per registered explainer, for ``xmllm explainers``."""
    rows: list[dict[str, Any]] = []
    for eid, cls in registered().items():
        rows.append(
            {
                "id": eid,
                "status": "implemented",
                "title": cls.title,
                "group": cls.group,
                "scope": cls.scope,
                "needs": sorted(n.value for n in cls.needs),
                "summary": cls.summary,
                "params": [spec.describe() for spec in cls.Params.specs()],
                "citations": [
                    {"title": c.title, "year": c.year, "arxiv": c.arxiv, "authors": c.authors}
                    for c in cls.citations
                ],
            }
        )
    return rows
