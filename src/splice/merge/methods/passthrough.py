"""Passthrough: copy the single input model's tensor, optionally multiplied by ``scale``.

    merged = θ_1 · scale     (scale = None leaves the tensor unchanged)

Same as mergekit's ``passthrough``. ``scale`` is a per-model parameter as in mergekit, so
it may be written at model level in a recipe (there is exactly one model).
"""

from collections.abc import Sequence

from torch import Tensor

from splice.merge.registry import PerModel, merge_method


@merge_method("passthrough", needs_base=False, min_models=1, max_models=1)
def passthrough(
    base: Tensor | None,
    tensors: Sequence[Tensor],
    *,
    scale: PerModel[float | None] = None,
) -> Tensor:
    """Return the one input unchanged, or multiplied by ``scale``."""
    t = tensors[0]
    return t if scale[0] is None else t.mul_(scale[0])
