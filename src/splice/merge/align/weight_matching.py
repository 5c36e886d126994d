"""Weight matching (Git Re-Basin: Ainsworth, Hayase & Srinivasa, ICLR 2023).

Find permutations π of model B's hidden units that bring its weights closest to model A's:

    max_π  Σ_ℓ ⟨W_A^ℓ, P_ℓ W_B^ℓ P_{ℓ-1}ᵀ⟩   (= min_π Σ_ℓ ‖W_A^ℓ − P_ℓ W_B^ℓ P_{ℓ-1}ᵀ‖²)

summed over every tensor an axis of which is permuted (biases included). The problem couples
the permutations, so it is solved by coordinate descent: holding every other permutation
fixed, the objective is linear in one permutation P (n units),

    Σ_{(W, axis) ∈ axes(P)} ⟨W_A, P · W̃_B⟩ = Σ_ij P_ij C_ij,
    C = Σ mat(W_A) · mat(W̃_B)ᵀ,

where W̃_B is W_B with all the *other* permutations applied and mat(·) moves the permuted
axis first and flattens the rest (a block unit of b entries flattens its b rows too). That is
a linear assignment problem, solved exactly by `scipy.optimize.linear_sum_assignment`
(maximize). Choices, as the official code (`samuela/git-re-basin`, `weight_matching.py`):

- start from the identity; each iteration visits the permutations in a fresh random order
  (seeded: ``seed`` and the iteration number; NumPy's generator here, JAX's there);
- an iteration makes progress when some step raises its objective term by more than a
  tolerance; stop after the first iteration without progress, or at ``max_iter`` (100);
- the tolerance is relative here, 1e-12·max(1, |old|), where the official code uses an
  absolute 1e-12 (float noise on large weights could otherwise count as progress);
- costs are accumulated in float64 (the official code uses float32).

The result ``perm[p]`` lists, for each position of A's units, which unit of B goes there:
``align`` returns B with ``W_B' = index_select(W_B, axis, perm)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from splice.merge.align.spec import (
    AlignmentError,
    PermutationSpec,
    apply_permutation,
    permute_tensor,
)


@dataclass(frozen=True)
class MatchResult:
    """The permutations found, the iterations run, the objective Σ⟨W_A, π(W_B)⟩ before
    (identity) and after, and whether the descent stopped by itself (not at max_iter)."""

    perms: dict[str, Tensor]
    iterations: int
    objective_before: float
    objective_after: float
    converged: bool


def check_pair(
    spec: PermutationSpec, reference: Mapping[str, Tensor], other: Mapping[str, Tensor]
) -> dict[str, int]:
    """Both state dicts hold the same tensor names with the same shapes, floating point and
    finite where permuted, and `spec` fits them; returns the unit counts."""
    missing = sorted(set(reference) ^ set(other))
    if missing:
        where = "the reference" if missing[0] not in reference else "the other model"
        raise AlignmentError(
            f"tensor '{missing[0]}' is missing from {where} ({len(missing)} names differ)"
        )
    for name, a in reference.items():
        if tuple(a.shape) != tuple(other[name].shape):
            raise AlignmentError(
                f"tensor '{name}' has shape {list(a.shape)} in the reference and "
                f"{list(other[name].shape)} in the other model"
            )
    return spec.unit_counts({k: tuple(v.shape) for k, v in reference.items()})


def _unit_rows(w: Tensor, axis: int, n: int) -> Tensor:
    return w.movedim(axis, 0).reshape(n, -1).to(torch.float64)


def objective(
    spec: PermutationSpec,
    reference: Mapping[str, Tensor],
    other: Mapping[str, Tensor],
    perms: Mapping[str, Tensor],
) -> float:
    """Σ ⟨W_A, π(W_B)⟩ over the tensors with at least one permuted axis."""
    names = {ref.tensor for refs in spec.perms.values() for ref in refs}
    total = 0.0
    for name in sorted(names):
        b = permute_tensor(spec, perms, name, other[name])
        total += float((reference[name].to(torch.float64) * b.to(torch.float64)).sum())
    return total


def cost_matrix(
    spec: PermutationSpec,
    reference: Mapping[str, Tensor],
    other: Mapping[str, Tensor],
    perms: Mapping[str, Tensor],
    p: str,
    n: int,
) -> Tensor:
    """C[i, j] = Σ over the axes of `p` of ⟨unit i of A, unit j of B (other permutations
    applied)⟩, float64."""
    cost = torch.zeros(n, n, dtype=torch.float64)
    for ref in spec.perms[p]:
        a = _unit_rows(reference[ref.tensor], ref.axis, n)
        b = permute_tensor(spec, perms, ref.tensor, other[ref.tensor], except_axis=ref.axis)
        cost += a @ _unit_rows(b, ref.axis, n).T
    return cost


def weight_matching(
    spec: PermutationSpec,
    reference: Mapping[str, Tensor],
    other: Mapping[str, Tensor],
    *,
    max_iter: int = 100,
    seed: int = 0,
) -> MatchResult:
    """Coordinate descent over the permutations of `spec` (module docstring)."""
    if max_iter < 1:
        raise AlignmentError(f"max_iter must be at least 1, got {max_iter}")
    if seed < 0:
        raise AlignmentError(f"seed must be >= 0, got {seed}")
    counts = check_pair(spec, reference, other)
    perms = {p: torch.arange(n) for p, n in counts.items()}
    before = objective(spec, reference, other, perms)
    names = list(perms)
    converged = False
    iteration = 0
    for iteration in range(1, max_iter + 1):
        progress = False
        order = np.random.default_rng([seed, iteration]).permutation(len(names))
        for k in order:
            p = names[int(k)]
            cost = cost_matrix(spec, reference, other, perms, p, counts[p])
            rows, cols = linear_sum_assignment(cost.numpy(), maximize=True)
            assert (rows == np.arange(len(rows))).all()
            new = torch.as_tensor(cols, dtype=torch.long)
            units = torch.arange(counts[p])
            old_value = float(cost[units, perms[p]].sum())
            new_value = float(cost[units, new].sum())
            progress = progress or new_value > old_value + 1e-12 * max(1.0, abs(old_value))
            perms[p] = new
        if not progress:
            converged = True
            break
    after = objective(spec, reference, other, perms)
    return MatchResult(perms, iteration, before, after, converged)


def align(
    reference: Mapping[str, Tensor],
    other: Mapping[str, Tensor],
    spec: PermutationSpec,
    *,
    max_iter: int = 100,
    seed: int = 0,
) -> dict[str, Tensor]:
    """`other` with its hidden units permuted to match `reference` by weight matching: the
    same function as `other`, weights as close as the spec's symmetries allow to
    `reference`'s."""
    result = weight_matching(spec, reference, other, max_iter=max_iter, seed=seed)
    return apply_permutation(spec, result.perms, other)
