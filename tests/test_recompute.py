"""Recompute instead of keep (explainers/recompute.py) and relevancy streamed through the recomputed backward.

Every explainer that differentiates the model runs with ``recompute=False`` and ``recompute=True``
and must give the same maps to float32 rounding; the recomputation must actually happen (hooks
inside a block count its second run). Relevancy with recompute must equal the slow reference, and
keep at most one layer's attention weights alive at a time where the kept run holds all of them.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from relevancy_reference import assert_close, forced, slow_relevancy, tiny_prepared

from xmllm.explainers import relevancy_propagation as rp
from xmllm.explainers.hooks import Hooks
from xmllm.explainers.memory import backward_copy_bytes, memory_budget, recompute_copy_bytes
from xmllm.explainers.recompute import recomputed_blocks, recomputing, resolve
from xmllm.explainers.registry import get_explainer
from xmllm.explainers.scaleplan import costs, recomputed

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

RTOL, ATOL = 1e-5, 1e-6

DIFFERENTIATING = [
    ("gradient.saliency", {}),
    ("gradient.saliency", {"engine": "captum", "per_token": False}),
    ("gradient.saliency", {"token_batch": 3}),
    ("gradient.input_x_gradient", {}),
    ("gradient.integrated", {"n_steps": 4}),
    ("gradient.gradcam", {}),
    ("neurons.top_activations", {"random_draws": 2}),
    ("relevancy.chefer", {}),
    ("relevancy.chefer", {"through": "vision"}),
    ("relevancy.chefer", {"through": "both"}),
    ("relevancy.chefer", {"batch": 2}),
    ("relevancy.modality", {}),
]

LONG_CHECKS = os.environ.get("XMLLM_LONG_CHECKS") == "1"
long_check = pytest.mark.skipif(not LONG_CHECKS, reason="a long check: .ci/run runs it as its own step (XMLLM_LONG_CHECKS=1)")



def demo_prepared(demo, text: str = "red circle blue"):
    from xmllm.explainers.demo.samples import generate_sample

    sample = generate_sample(0, 1)
    return forced(demo, [sample.image()], sample.text, text)


class Recomputations:
    """Counts forward calls of every module inside the decoder's and vision tower's first block,
    in the forward and in the backward's recomputation."""

    def __init__(self, adapter) -> None:
        points = adapter.hook_points()
        self.modules = [m for name, m in points.items()
                        if name.startswith(("decoder.blocks.0.", "vision.blocks.0."))]
        self.forward = self.recomputed = 0
        self._hooks = Hooks()

    def __enter__(self):
        def hook(*_args):
            if recomputing() is None:
                self.forward += 1
            else:
                self.recomputed += 1

        for module in self.modules:
            self._hooks.add(module.register_forward_hook(hook))
        return self

    def __exit__(self, *exc):
        self._hooks.remove()


def assert_same_maps(kept, recomputed_run) -> None:
    assert kept.maps.keys() == recomputed_run.maps.keys() and kept.maps
    for name in kept.maps:
        assert kept.maps[name].shape == recomputed_run.maps[name].shape, name
        assert np.allclose(kept.maps[name], recomputed_run.maps[name], rtol=RTOL, atol=ATOL), name
    for name, value in kept.scores.items():
        assert np.isclose(value, recomputed_run.scores[name], rtol=RTOL, atol=ATOL, equal_nan=True), name


def run_both(prep, explainer: str, params: dict):
    cls = get_explainer(explainer)
    with Recomputations(prep.adapter) as kept_count:
        kept = cls().explain(prep.loaded, prep, recompute=False, **params)
    with Recomputations(prep.adapter) as count:
        again = cls().explain(prep.loaded, prep, recompute=True, **params)
    assert kept_count.recomputed == 0 and count.recomputed > 0, (kept_count.recomputed, count.recomputed)
    assert kept.params["recompute"] is False and again.params["recompute"] is True
    return kept, again


# --- maps equal the kept run's ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("explainer", "params"), DIFFERENTIATING, ids=lambda v: v if isinstance(v, str) else
                         ",".join(f"{k}={w}" for k, w in v.items()) or "defaults")
def test_recompute_gives_the_kept_maps_on_the_demo(demo, explainer, params):
    kept, again = run_both(demo_prepared(demo), explainer, params)
    assert_same_maps(kept, again)


@pytest.mark.slow
@long_check
@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
@pytest.mark.parametrize(("explainer", "params"), [("gradient.saliency", {}), ("relevancy.chefer", {}),
                                                   ("relevancy.chefer", {"batch": 2})])
def test_recompute_gives_the_kept_maps_on_tiny_families(family, explainer, params):
    kept, again = run_both(tiny_prepared(family), explainer, params)
    assert_same_maps(kept, again)


def test_the_blocks_get_their_own_forward_back(demo):
    prep = demo_prepared(demo)
    blocks = [*prep.adapter.decoder_layers(), *prep.adapter.vision_layers()]
    with recomputed_blocks(prep.adapter) as counter:
        assert all("forward" in block.__dict__ for block in blocks)
        with torch.no_grad():  # no graph: nothing to checkpoint
            prep.forward()
        assert counter["checkpointed"] == 0
    assert not any("forward" in block.__dict__ for block in blocks)


# --- streamed relevancy equals the exact relevancy ----------------------------------------------------------------


def _eager_only(monkeypatch) -> None:
    """Send compute_relevancy down the eager path (tensor taps) instead of its own kernel."""
    monkeypatch.setattr(rp, "_ROW_ATTENTION_REGISTERED", False)


@pytest.mark.parametrize("path", ["kernel", "eager"])
def test_streamed_relevancy_with_recompute_matches_the_reference_on_the_demo(demo, path, monkeypatch):
    if path == "eager":
        _eager_only(monkeypatch)
    prepared = demo_prepared(demo)
    result = rp.compute_relevancy(prepared, recompute=True)
    assert result.kernel.endswith("blocks recomputed")
    assert result.kernel.startswith("streamed" if path == "kernel" else "eager")
    for k in range(len(prepared.answer.token_ids)):
        assert_close(result.decoder[k], slow_relevancy(prepared, k))
    assert_close(result.decoder_answer, slow_relevancy(prepared, "answer"))
    assert float(result.decoder.abs().sum()) > 0


@pytest.mark.slow
@long_check
@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "idefics3"])
@pytest.mark.parametrize("path", ["kernel", "eager"])
def test_streamed_relevancy_with_recompute_matches_the_reference_on_tiny_families(family, path, monkeypatch):
    if path == "eager":
        _eager_only(monkeypatch)
    prepared = tiny_prepared(family)
    result = rp.compute_relevancy(prepared, recompute=True)
    for k in range(len(prepared.answer.token_ids)):
        assert_close(result.decoder[k], slow_relevancy(prepared, k))
    assert_close(result.decoder_answer, slow_relevancy(prepared, "answer"))


# --- at most one layer's attention alive ---------------------------------------------------------------------------


class LiveAttention:
    """Weak references to the storage of every attention-weights tensor the decoder's attention
    modules produce (forward and recomputation), and how many are alive when the backward passes
    start and each time a layer's gradient reaches the row."""

    def __init__(self, prepared, monkeypatch) -> None:
        self.refs: list[StorageWeakRef] = []
        self.at_begin: list[int] = []
        self.at_open: list[int] = []
        self.modules = rp._attention_modules(prepared, rp.DECODER_ATTN_PREFIX)
        self._hooks = Hooks()
        open_, begin = rp._RowStream.open, rp._RowStream.begin

        def counting_open(stream, layer):
            self.at_open.append(self.alive())
            return open_(stream, layer)

        def counting_begin(stream, start):
            self.at_begin.append(self.alive())
            return begin(stream, start)

        monkeypatch.setattr(rp._RowStream, "open", counting_open)
        monkeypatch.setattr(rp._RowStream, "begin", counting_begin)

    def alive(self) -> int:
        return sum(not ref.expired() for ref in self.refs)

    def __enter__(self):
        def hook(_module, _args, output):
            weights = output[1]
            if torch.is_tensor(weights):
                self.refs.append(StorageWeakRef(weights.untyped_storage()))

        for _, module in self.modules:
            self._hooks.add(module.register_forward_hook(hook))
        return self

    def __exit__(self, *exc):
        self._hooks.remove()


@pytest.mark.parametrize("path", ["kernel", "eager"])
def test_recompute_keeps_at_most_one_layer_of_attention(demo, path, monkeypatch):
    if path == "eager":
        _eager_only(monkeypatch)
    prepared = demo_prepared(demo)
    layers = len(prepared.adapter.decoder_layers())
    assert layers > 1
    with LiveAttention(prepared, monkeypatch) as kept:
        rp.compute_relevancy(prepared, recompute=False)
    with LiveAttention(prepared, monkeypatch) as streamed:
        rp.compute_relevancy(prepared, recompute=True)
    targets = len(prepared.answer.token_ids) + 1
    # kept: every layer's attention is alive from the forward to the last backward
    assert kept.at_begin[0] == layers and kept.at_open[0] == layers
    # recomputed: none survives the forward; one (the layer being folded) during each backward
    assert len(streamed.at_open) == targets * layers
    assert streamed.at_begin == [0] * targets
    assert max(streamed.at_open) <= 1
    assert len(streamed.refs) == layers * (1 + targets)  # the forward, and one recomputation per backward


# --- choosing and projecting ------------------------------------------------------------------------------------


def test_auto_recomputes_only_where_the_budget_needs_it(demo):
    prep = demo_prepared(demo)
    kept = backward_copy_bytes(prep)
    assert resolve(True, lambda: kept, "cpu") is True and resolve(False, lambda: kept, "cpu") is False
    assert resolve("auto", lambda: kept, "cpu") is False  # a CPU without a budget: memory does not bound it
    with memory_budget(kept // 2):
        assert resolve("auto", lambda: kept, "cpu") is True
        assert get_explainer("gradient.saliency")().explain(prep.loaded, prep).params["recompute"] is True
    with memory_budget(kept * 10):
        assert resolve("auto", lambda: kept, "cpu") is False
    with pytest.raises(ValueError):
        resolve("sometimes", lambda: kept, "cpu")


def test_recompute_projection(demo):
    prep = demo_prepared(demo)
    for eager in (False, True):
        assert recompute_copy_bytes(prep, eager=eager) < backward_copy_bytes(prep, eager=eager)
    cost = costs(1, 4)
    again = recomputed(cost)
    assert again["forwards"] == 1 and again["backwards"] == 4 and again["recomputed_forwards"] == 4
    assert again["forward_equivalents"] == cost["forward_equivalents"] + 4


# --- measured against the projection (the bench's 576-image-token LLaVA, narrow layers) --------------------------


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    from xmllm.bench.models import forced_prepared, load_large

    loaded = load_large(tmp_path_factory.mktemp("llava576"), device="cpu")
    return forced_prepared(loaded, "what is in the picture", 4)


@pytest.mark.slow
@long_check
@pytest.mark.parametrize(("explainer", "params", "eager"), [
    ("gradient.saliency", {"per_token": False}, False),
    ("relevancy.chefer", {}, True),
])
def test_measured_peak_with_recompute_matches_the_projection(large, explainer, params, eager):
    """The peak tensor bytes with recompute are a fraction of the kept run's and within 25% of
    :func:`recompute_copy_bytes` (the kept run: of :func:`backward_copy_bytes`). Measured on this
    CPU, where on the 594-token model they were: saliency 37.0 MiB kept (projected 40.5), 10.2
    recomputed (10.1); relevancy 121.4 kept (146.1), 24.7 recomputed (29.0)."""
    from xmllm.bench.memory import peak_memory

    def run(recompute: bool):
        return peak_memory(lambda: get_explainer(explainer)().explain(large.loaded, large, recompute=recompute,
                                                                      **params), "cpu")[1].bytes

    kept, again = run(False), run(True)
    assert again < kept / 3
    assert again == pytest.approx(recompute_copy_bytes(large, eager=eager), rel=0.25)
    assert kept == pytest.approx(backward_copy_bytes(large, eager=eager), rel=0.25)


# --- with blocks offloaded to disk (accelerate's dispatch wraps each block's forward; recompute wraps that) --------


@pytest.mark.parametrize("explainer", ["gradient.saliency", "relevancy.chefer"])
def test_recompute_on_a_model_offloaded_to_disk_gives_the_plain_load_maps(explainer, tmp_path):
    pytest.importorskip("accelerate")
    from xmllm.explainers.models import load_model

    offloaded = load_model("demo", dtype="float32", device_map="auto", device_memory={"cpu": "4MB"},
                           offload_folder=tmp_path)
    plain = load_model("demo", dtype="float32")
    cls = get_explainer(explainer)
    kept = cls().explain(plain, demo_prepared(plain), recompute=False)
    again = cls().explain(offloaded, demo_prepared(offloaded), recompute=True)
    assert again.params["recompute"] is True
    assert_same_maps(kept, again)


def test_auto_recomputes_where_blocks_are_offloaded(tmp_path):
    """A kept backward would hold every offloaded block's loaded weights to its end: auto recomputes."""
    pytest.importorskip("accelerate")
    from xmllm.explainers.models import load_model
    from xmllm.explainers.recompute import offloaded

    disk = load_model("demo", dtype="float32", device_map="auto", device_memory={"cpu": "4MB"}, offload_folder=tmp_path)
    plain = load_model("demo", dtype="float32")
    assert offloaded(disk.model) and not offloaded(plain.model)
    for eid in ("gradient.saliency", "relevancy.chefer", "neurons.top_activations"):
        cls = get_explainer(eid)
        assert cls().explain(disk, demo_prepared(disk)).params["recompute"] is True, eid
        assert cls().explain(plain, demo_prepared(plain)).params["recompute"] is False, eid


def test_the_causal_sets_gradient_ranking_recomputes_to_the_same_set():
    from xmllm.explainers.models import load_model

    demo = load_model("demo", dtype="float32")
    cls = get_explainer("causal.minimal_set")
    kept = cls().explain(demo, demo_prepared(demo), rank_by="gradient", regenerate=False, recompute=False)
    again = cls().explain(demo, demo_prepared(demo), rank_by="gradient", regenerate=False, recompute=True)
    assert again.params["recompute"] is True and kept.params["recompute"] is False
    importance = [r["importance"] for r in kept.meta["ranking"]]
    assert np.allclose([r["importance"] for r in again.meta["ranking"]], importance, rtol=1e-5, atol=1e-7)
    assert again.meta["set"] == kept.meta["set"]
    assert_same_maps(kept, again)
