"""Relevancy's own attention kernel (the streamed backward) against the slow, literal reference.

``compute_relevancy`` runs the decoder's attention through a kernel of its own whose backward
skips exactly-zero blocks and folds each layer's gradient into the row; where a layer cannot use
it, the explainer runs eager attention instead. Both must give the reference's numbers on every
family, and the model must come back with its own attention kernel.
"""
from __future__ import annotations

import pytest
import torch
from relevancy_reference import assert_close, slow_relevancy, tiny_prepared
from tiny_models import FAMILIES

from xmllm.explainers.capture import attn_implementations
from xmllm.explainers.relevancy_propagation import ROW_ATTENTION, compute_relevancy

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

STREAMED = "streamed attention backward"
EAGER = "eager autograd"


@pytest.mark.parametrize("family", FAMILIES)
def test_the_kernel_gives_the_reference_numbers_on_every_family(family):
    prepared = tiny_prepared(family)
    before = attn_implementations(prepared.model.config)
    result = compute_relevancy(prepared, target="logit")
    assert result.kernel == STREAMED
    assert attn_implementations(prepared.model.config) == before
    assert ROW_ATTENTION not in str(attn_implementations(prepared.model.config))
    for k in range(len(prepared.answer.token_ids)):
        assert_close(result.decoder[k], slow_relevancy(prepared, k, "logit"))
    assert_close(result.decoder_answer, slow_relevancy(prepared, "answer", "logit"))
    assert float(result.decoder.abs().sum()) > 0


def test_a_layer_the_kernel_cannot_run_sends_the_explainer_down_the_eager_path():
    prepared = tiny_prepared("llava")
    streamed = compute_relevancy(prepared)
    modules = [m for name, m in prepared.adapter.hook_points().items()
               if name.startswith("decoder.blocks.") and name.endswith(".attn")]

    def with_softcap(_module, args, kwargs):
        # Llama's eager kernel ignores ``softcap``; for the row kernel it marks a family whose
        # eager attention differs, so that layer runs its own kernel and the explainer goes eager.
        return args, {**kwargs, "softcap": 1.0e9}

    handles = [modules[-1].register_forward_pre_hook(with_softcap, with_kwargs=True)]
    try:
        eager = compute_relevancy(prepared)
    finally:
        for handle in handles:
            handle.remove()
    assert streamed.kernel == STREAMED and eager.kernel == EAGER
    for k in range(len(prepared.answer.token_ids)):
        assert_close(eager.decoder[k], slow_relevancy(prepared, k))
    torch.testing.assert_close(streamed.decoder, eager.decoder, rtol=1e-4, atol=1e-7)


def test_the_explainer_records_how_its_gradients_were_taken():
    from xmllm.explainers.methods.relevancy import CheferRelevancy

    prepared = tiny_prepared("llava")
    assert CheferRelevancy().explain(prepared.loaded, prepared).meta["kernel"] == STREAMED
    assert CheferRelevancy().explain(prepared.loaded, prepared, through="both").meta["kernel"] == EAGER


def test_a_frozen_model_runs_the_kernel_with_the_same_numbers():
    prepared = tiny_prepared("qwen2_vl")
    model = prepared.model
    expected = compute_relevancy(prepared)
    flags = [p.requires_grad for p in model.parameters()]
    try:
        model.requires_grad_(False)  # no parameter builds a graph: the kernel's anchor still does
        frozen = compute_relevancy(prepared)
    finally:
        for param, flag in zip(model.parameters(), flags):
            param.requires_grad_(flag)
    assert frozen.kernel == STREAMED
    torch.testing.assert_close(frozen.decoder, expected.decoder, rtol=0, atol=0)
