"""GLM-5.3-Flash (glm5_next): GLM-4.1V's ``image_grid_thw`` merged grids (served as the generic
adapter serves GLM-4.1V), in front of a decoder whose residual stream is ``hc_mult`` hyper-connected
copies of the hidden state: every block takes and returns ``(batch, seq, hc_mult, hidden)``. The
model reads its logits as ``norm(hc_head(streams))`` (the streams' mean, then the final norm), so the
logit lens collapses the stream axis the same way before the norm and the LM head."""
from __future__ import annotations

from typing import ClassVar

import torch

from .base import register_adapter
from .generic import GenericAdapter


@register_adapter
class Glm5NextAdapter(GenericAdapter):
    """GLM-5.3-Flash: the generic ``image_grid_thw`` plans; the read-out collapses the residual streams."""

    model_types = ("glm5_next",)
    family: ClassVar[str] = "GLM-5.3-Flash"
    kind: ClassVar[str] = "own"

    def _streams(self) -> int:
        return int(self.config.get_text_config().hc_mult)

    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of residual-stream states ``(..., hc_mult, hidden)`` (the blocks' outputs), or of
        states already collapsed to ``(..., hidden)`` (2-D: one row per position)."""
        if hidden.dim() >= 3 and hidden.shape[-2] == self._streams():
            lead, streams, width = hidden.shape[:-2], hidden.shape[-2], hidden.shape[-1]
            # the model's own head, on the (batch, seq, streams, hidden) shape it is written for
            hidden = self.language_model.hc_head(hidden.reshape(-1, 1, streams, width)).reshape(*lead, width)
        return super().unembed(hidden)
