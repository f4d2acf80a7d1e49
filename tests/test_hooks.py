"""xmllm.explainers.hooks.Hooks on real torch modules: hooks live exactly as long as the ``with`` block.

Plain modules check the block itself (fires inside, gone after, gone on an error, gone when a later
registration fails); the tiny LLaVA checks explainer sites leave no hook on the model.
"""
from __future__ import annotations


import pytest
import torch
from torch import nn


from loaded_models import tiny_prepared

from xmllm.explainers.hooks import Hooks
from xmllm.explainers.readout import residual_states
from xmllm.explainers.methods.tokens import dropped_tokens
from xmllm.explainers.registry import get_explainer


def hooked(model: nn.Module) -> list[tuple[str, str]]:
    """``(module name, hook name)`` of every forward hook and pre-hook on the model, but
    transformers' own: it installs permanent output-capturing hooks on a model's first forward."""
    return [(name, getattr(hook, "__qualname__", repr(hook)))
            for name, m in model.named_modules() for hooks in (m._forward_pre_hooks, m._forward_hooks)
            for hook in hooks.values() if not getattr(hook, "__module__", "").startswith("transformers.")]


@pytest.fixture
def model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def test_hooks_fire_inside_the_block_and_are_gone_after(model):
    x = torch.randn(5, 4)
    plain = model(x)
    seen: list[str] = []

    def pre(_module: nn.Module, args: tuple) -> tuple:
        seen.append("pre")
        return (args[0] * 2,)

    def post(_module: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
        seen.append("post")
        return output + 1

    with Hooks() as hooks:
        handle = hooks.add(model[0].register_forward_pre_hook(pre))
        hooks.add(model[2].register_forward_hook(post))
        assert handle.id in model[0]._forward_pre_hooks  # add returns the handle itself
        edited = model(x)
    assert seen == ["pre", "post"]
    assert not torch.allclose(edited, plain)
    assert hooked(model) == []
    torch.testing.assert_close(model(x), plain, rtol=0, atol=0)
    assert seen == ["pre", "post"]  # nothing fired after the block


def test_hooks_are_removed_when_the_block_raises(model):
    x = torch.randn(2, 4)
    plain = model(x)

    def fail(_module: nn.Module, _args: tuple, _output: torch.Tensor) -> None:
        raise RuntimeError("forward failed")

    with pytest.raises(RuntimeError, match="forward failed"):
        with Hooks() as hooks:
            hooks.add(model[0].register_forward_pre_hook(lambda _m, args: None))
            hooks.add(model[2].register_forward_hook(fail))
            model(x)
    assert hooked(model) == []
    torch.testing.assert_close(model(x), plain, rtol=0, atol=0)


def test_a_registration_failing_part_way_removes_the_earlier_hooks(model):
    def broken_hook():
        raise KeyError("no such hook point")

    with pytest.raises(KeyError, match="no such hook point"):
        with Hooks() as hooks:
            hooks.add(model[0].register_forward_hook(lambda _m, _a, out: out))
            hooks.add(model[2].register_forward_pre_hook(lambda _m, args: args))
            hooks.add(model[2].register_forward_hook(broken_hook()))
    assert hooked(model) == []


def test_tensor_hooks_are_removed_too():
    w = torch.ones(3, requires_grad=True)
    y = w * 2
    grads: list[torch.Tensor] = []
    with Hooks() as hooks:
        hooks.add(y.register_hook(grads.append))
    y.sum().backward()
    assert grads == []  # the hook was gone before the backward ran
    torch.testing.assert_close(w.grad, torch.full((3,), 2.0))


def test_the_block_can_end_twice_and_removes_last_added_first():
    order: list[int] = []

    class Handle:
        def __init__(self, i: int) -> None:
            self.i = i

        def remove(self) -> None:
            order.append(self.i)

    hooks = Hooks()
    with hooks:
        for i in range(3):
            hooks.add(Handle(i))
    hooks.remove()  # nothing left: no handle is removed twice
    assert order == [2, 1, 0]


# --- explainer sites on the tiny LLaVA ---------------------------------------------------------------


@pytest.fixture(scope="module")
def prep():
    return tiny_prepared("llava", "what colour is the square", tokens=2)


def test_an_explainer_leaves_no_hook_on_the_model(prep):
    assert hooked(prep.model) == []
    exp = get_explainer("lens.logit")().explain(prep.loaded, prep)
    assert "answer.prob" in exp.maps
    assert hooked(prep.model) == []


def test_a_missing_hook_point_leaves_no_hook_behind(prep):
    """Block 0 is hooked before the missing block is looked up; the failure must take it off."""
    layers = len(prep.adapter.decoder_layers())
    with pytest.raises(KeyError):
        residual_states(prep, prep.logit_positions, [0, layers])
    assert hooked(prep.model) == []


def test_a_failing_forward_inside_a_site_leaves_no_hook_behind(prep):
    """tokens.dropped_tokens hooks every decoder attention; an error inside its block must still
    take them all off."""
    drop = torch.zeros(1, prep.seq_len, dtype=torch.bool)
    with pytest.raises(RuntimeError):
        with dropped_tokens(prep, drop):
            assert len(hooked(prep.model)) == len(prep.adapter.decoder_layers())
            raise RuntimeError("the forward failed")
    assert hooked(prep.model) == []
