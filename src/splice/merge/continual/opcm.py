"""OPCM: orthogonal-projection continual merging (Tang et al. 2025, "Merging Models on the
Fly Without Retraining: A Sequential Approach to Scalable Continual Model Merging";
reference code FusionBench ``fusion_bench/method/opcm/opcm.py``). The pure math.

State after t models (t >= 1): the merged task vector τ̄_t (stored as the merged model
base + τ̄_t), the scale λ_t, and the task-vector norms n_1 … n_t (n_i = ‖θ_i − base‖ over the
whole model). Model 1: τ̄_1 = τ_1, λ_1 = 1.

Adding model t+1 with task vector τ = θ_{t+1} − base, for each tensor:

    projected tensor (2-D, not an embedding table):
        τ̄_t = U S Vᵀ                         full SVD (U: m × m, V: n × n)
        k   = first index i with (Σ_{j<=i} s_j) / Σ_j s_j > α          (α = alpha, 0.5)
        P   = Uᵀ τ V;  P_ii = 0 for every i;  P[:k, :k] = 0
        τ'  = U P Vᵀ                          (τ without its components in the leading
                                               subspace of τ̄_t and on its diagonal)
    any other tensor:  τ' = τ

    u = λ_t τ̄_t + τ'                          (the un-normalised new merged task vector)

then over the whole model (the driver's second pass):

    n̄       = mean(n_1 … n_{t+1})
    λ_{t+1} = ‖u‖ / n̄
    τ̄_{t+1} = u / λ_{t+1}                     (the merged task vector keeps norm n̄)

Choices (all as the reference code):
- The diagonal of every singular pair is removed, also beyond the rank of τ̄_t; the split
  index is the first *strict* exceedance of α. The reference uses the full SVD; splice
  computes the same matrix from the thin SVD (see `opcm_projected_update`).
- A zero τ̄_t (nothing merged in that tensor yet) has no subspace: k = 0, only the diagonal
  of Uᵀ τ V (U = V = I up to signs from the SVD of zeros) is removed — as the reference would.
- Which tensors are projected: the reference projects the weights of ``nn.Linear`` modules.
  Without modules, splice projects every 2-D tensor whose name does not look like an
  embedding table (``embed``, ``wte``, ``wpe``); 1-D tensors (biases, norms) and others are
  added unprojected, as the reference does for non-Linear parameters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import Tensor

EMBEDDING_RE = re.compile(r"(embed|(^|\.)wte\.|(^|\.)wpe\.)")


def projects(name: str, shape: tuple[int, ...] | torch.Size) -> bool:
    """Whether OPCM projects this tensor (a 2-D linear weight) or adds it as it is."""
    return len(shape) == 2 and EMBEDDING_RE.search(name) is None


def opcm_split_rank(s: Tensor, alpha: float) -> int:
    """k: the first index at which the cumulative share of singular values exceeds α
    (0 when the values sum to 0 or never exceed α)."""
    total = s.sum()
    if total <= 0:
        return 0
    above = (s.cumsum(0) / total) > alpha
    return int(above.float().argmax())


def opcm_projected_update(
    merged_tv: Tensor, task_tv: Tensor, *, alpha: float, prev_lambda: float, project: bool
) -> Tensor:
    """u = λ_t τ̄_t + τ' for one tensor (see the module docstring); float32 or float64 in,
    same dtype out. Inputs are not modified."""
    if not project:
        return merged_tv * prev_lambda + task_tv
    # The reference's full-SVD projection, computed from the thin SVD: the zeroed entries
    # of P = Uᵀ τ V (the diagonal i < r = min(m, n) and the block [:k, :k]) involve only
    # the first r columns of U and V, so
    #   τ' = τ − U_k (U_kᵀ τ V_k) V_kᵀ − Σ_{k <= i < r} u_i (u_iᵀ τ v_i) v_iᵀ
    # which is the same matrix at O(m n r) instead of O(m² n) cost and memory.
    u, s, vh = torch.linalg.svd(merged_tv, full_matrices=False)
    k = opcm_split_rank(s, alpha)
    uk, vhk = u[:, :k], vh[:k]
    removed = uk @ (uk.T @ task_tv @ vhk.T) @ vhk
    ut, vht = u[:, k:], vh[k:]
    d = ((ut.T @ task_tv) * vht).sum(1)  # u_iᵀ τ v_i for k <= i < r
    removed += (ut * d) @ vht
    return merged_tv * prev_lambda + (task_tv - removed)


@dataclass
class OpcmState:
    """The scalars OPCM carries from one step to the next (the tensors live in the merged
    model itself)."""

    alpha: float = 0.5
    lambda_: float = 1.0
    task_vector_norms: list[float] = field(default_factory=list)
    models: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.task_vector_norms)

    def next_lambda(self, new_norm: float, update_norm: float) -> tuple[float, float]:
        """(λ_{t+1}, n̄) after a model with task-vector norm ``new_norm`` whose
        un-normalised merged update has norm ``update_norm``."""
        norms = [*self.task_vector_norms, new_norm]
        mean = sum(norms) / len(norms)
        return (update_norm / mean if mean > 0 else 1.0), mean

    def to_json(self) -> dict:
        return {
            "method": "opcm",
            "format": 1,
            "alpha": self.alpha,
            "lambda": self.lambda_,
            "task_vector_norms": self.task_vector_norms,
            "models": self.models,
        }

    @classmethod
    def from_json(cls, data: dict) -> OpcmState:
        return cls(
            alpha=float(data["alpha"]),
            lambda_=float(data["lambda"]),
            task_vector_norms=[float(x) for x in data["task_vector_norms"]],
            models=[str(m) for m in data.get("models", [])],
        )
