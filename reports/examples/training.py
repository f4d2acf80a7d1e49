"""The example of an explainer that needs two checkpoints of one model (``Need.CHECKPOINTS``): the
example sample on the model and its earlier checkpoint, given as the explainer's ``other``."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from xmllm.explainers.registry import Need

from ..cache import model_folder, weights_fingerprint
from . import ExampleRun, ExampleSkipped, example_builder
from .sample import example_sample

if TYPE_CHECKING:  # pragma: no cover
    from xmllm.explainers.registry import Explainer

    from ..session import ModelSession

EARLY = "early"
"""Name of the earlier checkpoint's folder beside a model's (``demo train`` writes final/ and early/)."""


def earlier_checkpoint(spec: str) -> tuple[str, Path] | None:
    """The spec and folder of the model's earlier checkpoint: ``demo-early`` for the demo model,
    a sibling ``early/`` folder for a local one; None when there is none."""
    if spec == "demo":
        from xmllm.explainers.demo import DEMO_EARLY_MODEL_DIR

        return ("demo-early", DEMO_EARLY_MODEL_DIR) if (DEMO_EARLY_MODEL_DIR / "config.json").is_file() else None
    folder = model_folder(spec)
    if folder is None:
        return None
    early = folder.parent / EARLY
    return (str(early), early) if early != folder and (early / "config.json").is_file() else None


@example_builder(Need.CHECKPOINTS.value)
def training_example(session: "ModelSession", cls: "type[Explainer]") -> ExampleRun:
    found = earlier_checkpoint(session.spec)
    if found is None:
        raise ExampleSkipped(f"no earlier checkpoint to compare {session.spec} with (an '{EARLY}/' folder beside it)")
    other, folder = found
    run_dir, cached = session.run(example_sample(), cls.id, {"other": other},
                                  key_extra={"other_weights": weights_fingerprint(str(folder))})
    return ExampleRun(run_dir, cached)
