"""Building blocks shared by the SVD-based methods (TSV, Iso-C, Iso-CTS).

Every method in this family treats a 2-D tensor as a matrix and anything else (biases, norm
scales, 1-D or >2-D tensors) as a plain vector that has no singular structure; the reference
implementations (TSV, iso-merging) average those task vectors, and so do these methods.
The reference code also skips CLIP's ``text_projection``; splice does not special-case names.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor


def is_matrix(t: Tensor) -> bool:
    """True for 2-D tensors, which the SVD methods merge in their subspaces."""
    return t.ndim == 2


def polar(x: Tensor) -> Tensor:
    """The orthogonal polar factor of ``x``: with x = P Σ Qᵀ (thin SVD), P Qᵀ.

    The nearest matrix with orthonormal columns (or rows, when x is wide) to ``x``; this is
    how TSV and Iso-CTS orthogonalize concatenated singular vectors.
    """
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


def top_triplets(mats: Iterable[Tensor], k: int) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """The top-``k`` singular triplets of each matrix (thin SVD): lists of U[:, :k], Σ[:k]
    and Vᵀ[:k], in the order of ``mats``."""
    us, ss, vhs = [], [], []
    for m in mats:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vhs.append(vh[:k])
    return us, ss, vhs


def sum_(deltas: Sequence[Tensor]) -> Tensor:
    """Σ δ_i, in order, in place in the first task vector."""
    out = deltas[0]
    for d in deltas[1:]:
        out.add_(d)
    return out


def mean_(deltas: Sequence[Tensor]) -> Tensor:
    """Σ δ_i / N, in place in the first task vector."""
    return sum_(deltas).div_(len(deltas))
