"""What OFT and HRA share: an adapter that transforms a linear layer's input, x' = M x (M:
in×in, x a column), on nn.Linear or GPT-2 Conv1D. Its delta against the base W:

    nn.Linear (W: out×in):          y = W M x      W' = W M     (`Folded` matmul_right M)
    GPT-2 Conv1D (W stored in×out): y = xᵀ Mᵀ W    W' = Mᵀ W    (`Folded` matmul_left Mᵀ)
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from splice.adapters.layer import AdapterModule
from splice.adapters.targeting import linear_features
from splice.delta import Delta, Folded


class InputTransform(AdapterModule):
    """An input transform on a Linear / Conv1D; subclasses give `input_matrix`."""

    def __init__(self, in_features: int, conv1d: bool) -> None:
        super().__init__()
        self.in_features = in_features
        self.conv1d = conv1d

    def input_matrix(self) -> Tensor:
        """M (in×in, float32) with x' = M x."""
        raise NotImplementedError

    def delta(self, base: nn.Module) -> dict[str, Delta]:
        m = self.input_matrix()
        size = tuple(base.weight.shape)
        if self.conv1d:
            return {"weight": Folded("matmul_left", {"matrix": m.T}, size)}
        return {"weight": Folded("matmul_right", {"matrix": m}, size)}


def build_on_linear(
    base: nn.Module, make: Callable[[int, bool], InputTransform]
) -> InputTransform | None:
    """``make(in_features, conv1d)`` for an nn.Linear / Conv1D base, on the base's device
    (None for another layer type)."""
    features = linear_features(base)
    if features is None:
        return None
    in_features, _, conv1d = features
    return make(in_features, conv1d).to(device=base.weight.device)
