"""Rank reduction of a product B @ A without forming the out×in matrix.

    B = Q_B R_B         (QR of B, out×R)
    Aᵀ = Q_A R_A        (QR of Aᵀ, in×R)
    B @ A = Q_B (R_B R_Aᵀ) Q_Aᵀ,   core C = R_B R_Aᵀ is R×R
    C = U S Vᵀ  =>  B @ A = (Q_B U) S (Q_A V)ᵀ

so the singular values of B @ A are those of the small core and the truncated SVD of the
product is read off the core's. Cost O((out + in) R² + R³) instead of O(out · in · R).
Arithmetic in float64; results cast back to the input dtype (float32 at least).

Convention (PEFT's `svd` combination, from kohya's `svd_merge_lora`): the singular values go
into B: B' = U_r diag(S_r), A' = V_rᵀ.
"""

from __future__ import annotations

import torch


def _out_dtype(*ts: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in ts:
        if t.dtype == torch.float64:
            dtype = torch.float64
    return dtype


def factor_svd(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vh) of B @ A with U: out×k, S: k, Vh: k×in, k = min(out, in, R)."""
    dtype = _out_dtype(b, a)
    q_b, r_b = torch.linalg.qr(b.double())
    q_a, r_a = torch.linalg.qr(a.double().T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    return (q_b @ u).to(dtype), s.to(dtype), (vh @ q_a.T).to(dtype)


def truncate_factors(
    b: torch.Tensor, a: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` factors (B', A') of B @ A (Eckart–Young), S folded into B'."""
    u, s, vh = factor_svd(b, a)
    r = min(rank, s.numel())
    return u[:, :r] * s[:r], vh[:r]


def truncate_dense(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` factors of a dense out×in matrix (exact SVD in float64)."""
    dtype = _out_dtype(delta)
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    r = min(rank, s.numel())
    return (u[:, :r] * s[:r]).to(dtype), vh[:r].to(dtype)
