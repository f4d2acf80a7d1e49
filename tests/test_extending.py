"""Adding an explainer is one class: registered from a module outside the project, it runs,
reports (its noise hint and its why-panel sentence included), is evaluated with the parameters
it declares, is measured by the scale bench through its own plan and gets its explainer page,
with no other file changed.

The explainer is written into a temporary folder and imported from there; its registration is
undone after the module's tests.
"""
from __future__ import annotations

import importlib.util
import sys
import textwrap
import warnings

import pytest
import torch
from html_tree import parse
from tiny_models import TEST_IMAGE_SIZES, build_tiny, tiny_image

import xmllm
from xmllm.explainers.demo.samples import generate_samples
from xmllm.explainers.registry import _REGISTRY, get_explainer

MODULE = "xmllm_test_extending_plugin"
EXPLAINER_ID = "extending.hidden_norm"
NOISE_HINT = "raise the scale (--param extending.hidden_norm.scale=1000)"
PLAN_NOTE = "scale 1 (the map's scale leaves the peak as it is)"

SOURCE = textwrap.dedent(f'''
    """An explainer written outside xmllm, for its test of adding one."""
    from __future__ import annotations

    from dataclasses import dataclass
    from typing import Any, ClassVar, Mapping

    import numpy as np
    import torch

    from xmllm.explainers.explanation import Explanation
    from xmllm.explainers.params import ExplainerParams, param
    from xmllm.explainers.registry import Explainer, register
    from xmllm.explainers.scaleplan import ScalePlan, costs


    @register
    class HiddenNorm(Explainer):
        """The norm of the last decoder block's hidden state at each image cell, times a scale.

        Cost: one forward of the final sequence. No paper: a stand-in for a new method.
        """

        id = "{EXPLAINER_ID}"
        title = "Hidden-state norm per image cell"
        group = "extending"
        summary = "How large the last hidden state is at each cell of the image grid."
        noise_hint = "{NOISE_HINT}"
        evaluation_params: ClassVar[Mapping[str, Any]] = {{"scale": 0.5}}

        @dataclass(frozen=True)
        class Params(ExplainerParams):
            scale: float = param(1e-6, "multiplies the map (the default leaves it near numerical noise)", low=0.0)

        @classmethod
        def why(cls, explanation: Explanation) -> str | None:
            row, col = explanation.meta["largest_cell"]
            return f"the last hidden state is largest at row {{row}}, column {{col}}"

        @classmethod
        def scale_plan(cls, prep: Any, full_layers: int) -> ScalePlan:
            return ScalePlan({{"scale": 1.0}}, "{PLAN_NOTE}", cost=costs(1))

        def compute(self, model: Any, prep: Any, params: Any) -> Explanation:
            with torch.no_grad():
                out = prep.forward(output_hidden_states=True, use_cache=False)
            norms = out.hidden_states[-1][0].float().norm(dim=-1)
            values = prep.layouts[0].main_grid.gather(norms.cpu()) * params.scale
            largest = np.unravel_index(int(values.argmax()), tuple(values.shape))
            exp = Explanation(self.id, params.as_dict(), prep.target(),
                              meta={{"largest_cell": [int(largest[0]), int(largest[1])]}})
            exp.add("image.answer", values, ("row", "col"))
            return exp
''')


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    """The explainer's class, imported from a file outside the project; unregistered afterwards."""
    get_explainer("gradient.saliency")  # the built-ins first, as any caller's first look-up loads them
    path = tmp_path_factory.mktemp("plugin") / f"{MODULE}.py"
    path.write_text(SOURCE, encoding="utf-8")
    spec = importlib.util.spec_from_file_location(MODULE, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE] = module
    try:
        spec.loader.exec_module(module)
        yield module.HiddenNorm
    finally:
        _REGISTRY.pop(EXPLAINER_ID, None)
        sys.modules.pop(MODULE, None)


@pytest.fixture(scope="module")
def demo():
    return xmllm.load_model("demo", device="cpu")


@pytest.fixture(scope="module")
def run(plugin, demo):
    sample = generate_samples(1, seed=0, question_types=["colour"])[0]
    return xmllm.explain(demo, sample.image(), sample.text, [EXPLAINER_ID, "causal.minimal_set"],
                         params={"causal.minimal_set": {"regenerate": False}})  # its sentence, at a third of the cost


def test_it_runs_and_the_report_shows_its_hint_and_its_sentence(plugin, run) -> None:
    exp = run[EXPLAINER_ID]
    assert exp.axes["image.answer"] == ("row", "col")
    assert 0 < abs(exp.maps["image.answer"]).max() < 1e-3  # the default scale: near numerical noise
    tree = parse(run.report_html())
    figure = next(f for f in tree.find(id="why-maps").find_all("figure") if f.attrs["data-explainer"] == EXPLAINER_ID)
    assert NOISE_HINT in figure.text
    sentences = [p.text for p in tree.find(id="why").find_all("p") if "causal" in p.classes()]
    row, col = exp.meta["largest_cell"]
    ours = f"the last hidden state is largest at row {row}, column {col} ({EXPLAINER_ID})."
    assert sentences[0] == ours  # in run order: ours, then the causal set's
    assert len(sentences) == 2 and "causal.minimal_set" in sentences[1]


def test_evaluate_scores_it_with_its_declared_parameters(plugin, demo) -> None:
    result = xmllm.evaluate(demo, demo=2, explainers=[EXPLAINER_ID], steps=2, sanity_samples=0)
    assert result["config"]["explainers"] == [EXPLAINER_ID]
    assert result["config"]["params"][EXPLAINER_ID] == {"scale": 0.5}
    assert isinstance(result["table"][EXPLAINER_ID]["pointing_game"]["mean"], float)


def test_the_scale_bench_measures_it_by_its_own_plan(plugin) -> None:
    from xmllm.bench import scale
    from xmllm.bench.free_compute import materialise, parameters_on_meta
    from xmllm.explainers.models import LoadedModel, adapter_for

    model, processor = build_tiny("llava")
    vision = model.config.vision_config.num_hidden_layers

    def builder(layers: int, vision_layers: int) -> LoadedModel:
        import copy

        config = copy.deepcopy(model.config)
        config.text_config.num_hidden_layers = layers
        config.vision_config.num_hidden_layers = vision_layers
        with warnings.catch_warnings(), parameters_on_meta():
            warnings.simplefilter("ignore")
            cut = type(model)(config)
        cut = materialise(cut, torch.bfloat16, values="free")
        cut.set_attn_implementation("eager")
        cut.generation_config.eos_token_id = None
        return LoadedModel(cut, processor, adapter_for(cut, processor), "tiny-llava (cut)", "tests",
                           torch.device("cpu"), torch.bfloat16, eager_attention=True)

    points = [(1, vision), (2, vision)]
    runs, plans, small, _ = scale.measure_points(builder, tiny_image(*TEST_IMAGE_SIZES["llava"]), [EXPLAINER_ID],
                                                 points, (4, vision), None, torch.device("cpu"))
    assert plans[EXPLAINER_ID].note == PLAN_NOTE and plans[EXPLAINER_ID].params == {"scale": 1.0}
    assert all(m.error is None and m.peak and m.peak > 0 for m in runs[EXPLAINER_ID].values())
    row = scale.projection(runs[EXPLAINER_ID], points, plans[EXPLAINER_ID], small.get(EXPLAINER_ID), (4, vision),
                           vision=False)
    assert row["projected_activation_bytes"] > 0


def test_its_explainer_page_carries_its_docstring(plugin) -> None:
    from xmllm.site.explainers import explainer_page, generate

    pages = {page.path: page.content for page in generate({}).pages}
    text = pages[explainer_page(EXPLAINER_ID)]
    assert "# Hidden-state norm per image cell" in text
    assert "The norm of the last decoder block's hidden state at each image cell" in text
    assert "Cost: one forward of the final sequence" in text
    assert "scale" in text and "An explainer written outside xmllm" in text
