"""Relevancy's references, shared by its tests: tiny models of every family with a given answer
forced (exact maths needs no trained model), and the slow, literal Chefer et al. computation from
attention weights and their gradients, hooked out of a plain forward."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import TEST_IMAGE_SIZES, build_tiny, missing_dependency, tiny_image

from xmllm.explainers.answering import Answer
from xmllm.explainers.prepared import ExplainSample, prepare
from xmllm.explainers.relevancy_propagation import DEFAULT_TARGET
from xmllm.explainers.models import LoadedModel, adapter_for

TINY_QUESTION = "what colour is the square"
TINY_ANSWER = "the answer is red"
RTOL, ATOL = 1e-4, 1e-7
"""The reference runs in float64, the explainer in float32: agreement to float32 precision."""



_TINY: dict[tuple[str, bool], LoadedModel] = {}


def tiny_loaded(family: str, eager: bool = True) -> LoadedModel:
    """A tiny random model of ``family`` wrapped as a LoadedModel (built once per session)."""
    package = missing_dependency(family)
    if package:
        pytest.skip(f"the {family} processor needs {package}, which is not installed")
    key = (family, eager)
    if key not in _TINY:
        model, processor = build_tiny(family)
        if eager:
            model.set_attn_implementation("eager")
        _TINY[key] = LoadedModel(model, processor, adapter_for(model, processor), spec=f"tiny-{family}",
                                 source="tests/tiny_models.py", device=torch.device("cpu"), dtype=torch.float32,
                                 eager_attention=eager)
    return _TINY[key]


def forced(loaded: LoadedModel, images, question: str, text: str):
    """The final sequence with a given answer (no generation): exact maths needs no trained model."""
    ids = loaded.adapter.tokenize_answer(text)
    tokens = tuple(loaded.processor.tokenizer.convert_ids_to_tokens(ids))
    sample = ExplainSample(list(images), question)
    return prepare(loaded, sample, answer=Answer(text, tuple(ids), tokens, tuple(0.0 for _ in ids)))


def tiny_prepared(family: str, text: str = TINY_ANSWER):
    loaded = tiny_loaded(family)
    return forced(loaded, [tiny_image(*TEST_IMAGE_SIZES[family])], TINY_QUESTION, text)


def _attention_hooks(modules, store):
    def make(i):
        def hook(_m, _a, output):
            weights = output[1]
            if weights.requires_grad:
                weights.retain_grad()
            store[i] = weights

        return hook

    return [m.register_forward_hook(make(i)) for i, m in enumerate(modules)]


def slow_relevancy(prepared, which, target: str = DEFAULT_TARGET, through: str = "decoder") -> np.ndarray:
    """Relevancy over decoder positions for answer token ``which`` (an int) or the whole answer ("answer")."""
    model, adapter = prepared.model, prepared.adapter
    points = adapter.hook_points()
    decoder = [points[f"decoder.blocks.{i}.attn"] for i in range(len(adapter.decoder_layers()))]
    vision = [points[f"vision.blocks.{i}.attn"] for i in range(len(adapter.vision_layers()))]
    dec_store, vis_store = {}, {}
    hooks = _attention_hooks(decoder, dec_store) + _attention_hooks(vision, vis_store)
    try:
        with torch.enable_grad():
            logits = prepared.forward().logits
            if target == "logprob":
                values = prepared.answer_logprobs(logits)[0]
            else:
                ids = torch.tensor(prepared.answer.token_ids)
                values = logits[0, prepared.logit_positions, ids]
            y = values.sum() if which == "answer" else values[which]
            model.zero_grad()
            y.backward()
    finally:
        for h in hooks:
            h.remove()
    n = prepared.seq_len
    eye = torch.eye(n, dtype=torch.float64)
    R = eye.clone()
    for i in range(len(decoder)):
        A = dec_store[i]
        Abar = (A.grad.double() * A.double()).clamp(min=0).mean(dim=1)[0]
        R = R + Abar @ R
    positions = prepared.logit_positions.tolist() if which == "answer" else [int(prepared.logit_positions[which])]
    row = sum((R - eye)[p] for p in positions)
    model.zero_grad()
    if through == "decoder":
        return row.detach().numpy()

    token_map = adapter.vision_token_map(prepared.inputs)
    out = torch.zeros(n, dtype=torch.float64)
    for b in range(token_map.shape[0]):
        nv = token_map.shape[1]
        Rv = torch.eye(nv, dtype=torch.float64)
        for i in range(len(vision)):
            A = vis_store[i]
            if A.grad is None:  # a block after the layer the projector reads: no gradient reaches it
                continue
            Abar = (A.grad[b].double() * A[b].double()).clamp(min=0).mean(dim=0)
            Rv = Rv + Abar @ Rv
        Rhat = Rv - torch.eye(nv, dtype=torch.float64)
        sums = Rhat.sum(dim=-1, keepdim=True)
        sums[sums == 0] = 1
        Rbar = Rhat / sums + torch.eye(nv, dtype=torch.float64)
        fmap = token_map[b]
        w = torch.zeros(nv, dtype=torch.float64)
        for q in range(nv):
            pos = int(fmap[q])
            if pos >= 0:
                share = 1.0 / int((token_map == pos).sum())
                w[q] = (row[pos] if through == "both" else 1.0) * share
        m = w @ Rbar if through == "both" else w @ (Rbar - torch.eye(nv, dtype=torch.float64))
        for q in range(nv):
            if int(fmap[q]) >= 0:
                out[int(fmap[q])] += m[q]
    return out.detach().numpy()


def assert_close(fast, slow):
    fast, slow = np.asarray(fast, dtype=np.float64), np.asarray(slow, dtype=np.float64)
    np.testing.assert_allclose(fast, slow, rtol=RTOL, atol=ATOL)
