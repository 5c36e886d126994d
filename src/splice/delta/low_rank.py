"""`LowRank`: ΔW = s · B A kept factored (LoRA and everything that stays low-rank).

B is out×r and A is r×in, as PEFT stores `lora_B` / `lora_A`. ``transposed`` says the base
weight receives (B A)ᵀ instead: GPT-2's Conv1D (weights stored in×out, PEFT's
``fan_in_fan_out``) and embeddings (PEFT's ``lora_embedding_A`` is r×num, B is dim×r, the
table is num×dim). ``weight_shape`` reshapes the product for a convolution (B: out×r from an
out×r×1×1 kernel, A: r×(in·k·k)), None for a 2-D weight.

Rank reduction never forms the out×in matrix:

    B = Q_B R_B, Aᵀ = Q_A R_A (thin QR), core C = R_B R_Aᵀ (R×R), C = U S Vᵀ
    =>  B A = (Q_B U) S (Q_A V)ᵀ

so the singular values of B A are the core's and the best rank-k approximation (Eckart–Young)
is read off it in O((out + in) R² + R³). Arithmetic in float64; singular values go into B
(B' = U_k diag(S_k), A' = V_kᵀ, PEFT's and kohya's convention).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from splice.delta._common import DeltaOps, element_bytes, float_dtype
from splice.delta.base import DeltaError, check_factor, delta_type


def factor_svd(b: Tensor, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(U, S, Vh) of B @ A with U: out×k, S: k, Vh: k×in, k = min(out, in, R)."""
    dtype = torch.float64 if torch.float64 in (b.dtype, a.dtype) else torch.float32
    q_b, r_b = torch.linalg.qr(b.double())
    q_a, r_a = torch.linalg.qr(a.double().T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    return (q_b @ u).to(dtype), s.to(dtype), (vh @ q_a.T).to(dtype)


def truncate_factors(b: Tensor, a: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Best rank-`rank` factors (B', A') of B @ A (Eckart–Young), S folded into B'."""
    u, s, vh = factor_svd(b, a)
    r = min(rank, s.numel())
    return u[:, :r] * s[:r], vh[:r]


def truncate_dense(delta: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Best rank-`rank` factors of a dense out×in matrix (exact SVD in float64)."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    r = min(rank, s.numel())
    dtype = float_dtype(delta)
    return (u[:, :r] * s[:r]).to(dtype), vh[:r].to(dtype)


@delta_type("low_rank")
@dataclass(frozen=True)
class LowRank(DeltaOps):
    b: Tensor
    a: Tensor
    scaling: float = 1.0
    transposed: bool = False
    weight_shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.b.dim() != 2 or self.a.dim() != 2 or self.b.shape[1] != self.a.shape[0]:
            raise DeltaError(
                f"low-rank factors must be B out×r and A r×in; got {list(self.b.shape)}, "
                f"{list(self.a.shape)}"
            )
        check_factor(self.scaling)
        if self.weight_shape is not None:
            object.__setattr__(self, "weight_shape", tuple(int(s) for s in self.weight_shape))
            n = 1
            for s in self.weight_shape:
                n *= s
            if self.transposed or n != self.b.shape[0] * self.a.shape[1]:
                raise DeltaError(
                    f"weight_shape {list(self.weight_shape)} does not hold a "
                    f"{self.b.shape[0]}×{self.a.shape[1]} product (and excludes transposed)"
                )

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        if self.weight_shape is not None:
            return self.weight_shape
        out, inn = self.b.shape[0], self.a.shape[1]
        return (inn, out) if self.transposed else (out, inn)

    @property
    def nbytes(self) -> int:
        return element_bytes(self.b) + element_bytes(self.a)

    def to_dense(self, base: Tensor | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        d = (self.b.to(dtype) @ self.a.to(dtype)) * self.scaling
        if self.transposed:
            return d.T
        return d if self.weight_shape is None else d.reshape(self.weight_shape)

    def scale(self, factor: float) -> LowRank:
        return self._with(self.b, self.a, self.scaling * check_factor(factor))

    def truncate(self, rank: int) -> LowRank:
        """The best rank-`rank` approximation (exact when rank ≥ the current rank)."""
        if rank < 1:
            raise DeltaError(f"rank must be at least 1, got {rank}")
        b, a = truncate_factors(self.b, self.a, rank)
        return self._with(b.to(self.b.dtype), a.to(self.a.dtype), self.scaling)

    def _add_same(self, other: LowRank) -> LowRank | None:
        if (self.transposed, self.weight_shape) != (other.transposed, other.weight_shape):
            return None
        if self.scaling == other.scaling:
            return self._with(
                torch.cat([self.b, other.b], 1), torch.cat([self.a, other.a], 0), self.scaling
            )
        b = torch.cat([self.b * self.scaling, other.b * other.scaling], 1)
        return self._with(b, torch.cat([self.a, other.a], 0), 1.0)

    def _with(self, b: Tensor, a: Tensor, scale: float) -> LowRank:
        return LowRank(b, a, scale, self.transposed, self.weight_shape)

    def tensors(self) -> dict[str, Tensor]:
        return {"b": self.b, "a": self.a}

    def attributes(self) -> dict[str, Any]:
        shape = None if self.weight_shape is None else list(self.weight_shape)
        return {"scaling": self.scaling, "transposed": self.transposed, "weight_shape": shape}
