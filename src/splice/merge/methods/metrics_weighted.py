"""Metrics-weighted averaging (MWA; Yu & Choi 2025, "Parameter-Efficient Checkpoint Merging
via Metrics-Weighted Averaging", arXiv:2504.18580): a weighted average of checkpoints of
one training run, weighted by their training loss or their step.

With one metric m_i > 0 per checkpoint and the penalty factor p:

    by: loss   s_i = (1 / m_i)^p      (lower loss, more weight)
    by: step   s_i = m_i^p            (later step, more weight)
    w_i = s_i / Σ_j s_j
    merged = Σ_i w_i θ_i

p = 0 is the uniform average; a larger p moves the weight towards the best (or latest)
checkpoint. The weights depend on the metric ratios only, so the loss scale does not matter.

Choices: no base model (checkpoints are averaged, as in the paper). The weights are
computed in float64 from max-normalised metrics (m_i / max m) so that large steps with a
large p do not overflow. Note: the paper's own formula text was not available to the author
of this file; the normalised power form above is what the abstract describes (one penalty
hyper-parameter, independent of the number of checkpoints) — verify against the paper.
"""

from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import Field
from torch import Tensor

from splice.merge.registry import PerModel, merge_method


def mwa_weights(metric: Sequence[float], by: str, penalty: float) -> list[float]:
    """Normalised MWA weights for one metric value per checkpoint."""
    top = max(metric)
    rel = [m / top for m in metric]
    scores = [(1 / r) ** penalty if by == "loss" else r**penalty for r in rel]
    total = sum(scores)
    return [s / total for s in scores]


@merge_method("metrics_weighted", needs_base=False)
def metrics_weighted(
    base: Tensor | None,
    tensors: Sequence[Tensor],
    *,
    metric: PerModel[Annotated[float, Field(gt=0)]],
    by: Literal["loss", "step"] = "loss",
    penalty: Annotated[float, Field(ge=0)] = 1.0,
) -> Tensor:
    """Average checkpoints weighted by loss or step, sharpened by a penalty factor."""
    weights = mwa_weights(metric, by, penalty)
    out = tensors[0].mul_(weights[0])
    for t, w in zip(tensors[1:], weights[1:], strict=True):
        out.add_(t, alpha=w)
    return out
