"""HRA (Yuan et al. 2024, "Bridging The Gap between Low-rank and Orthogonal Adaptation via
Householder Reflection Adaptation"), in PEFT 0.21's form.

For a linear layer y = W x + b with W: out×in and r vectors u_1..u_r in R^in (the columns of
the trainable ``hra_u``, in×r):

    H_i = I − 2 û_i û_iᵀ,   û_i = u_i / ‖u_i‖
    W'  = W H_1 H_2 ⋯ H_r,        ΔW = W (H − I)   given the base W,   H = H_1 ⋯ H_r

``apply_GS=True``: the u_i are first orthonormalised by Gram–Schmidt in column order
(q_1, …, q_r), and then H = I − 2 Q Qᵀ (the product of the reflections in orthonormal
directions; PEFT's formula).

Computation: y = W' x + b = W (H x) + b, so splice reflects the *input* — Hᵀ applied to a
row vector x is x H_r H_{r−1} ⋯ H_1 (each H_i symmetric): r rank-one updates, O(r·in) per
token, never the in×in matrix. PEFT builds W H densely; the two agree to float rounding.
Dtypes as PEFT: the whole layer runs in the adapter's dtype (x, W and b cast to it, float32
on a bf16 base) and its output is rounded once to the base's dtype.

Init (PEFT's, init_weights=True): r/2 kaiming-uniform vectors, each repeated twice
(u_1 = u_2, u_3 = u_4, …), so H_1 H_2 = I and the adapted model starts equal to the base.
With odd r that pairing is impossible: PEFT warns and draws all r at random (the model does
not start at the base); splice does the same. init_weights=False: all r random.

Supports nn.Linear (as PEFT) and GPT-2 Conv1D (splice only: W stored in×out, W' = Hᵀ W).
Saved key: ``hra_u`` (in×r), PEFT's name.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from splice.adapters.config import AdapterConfig
from splice.adapters.layer import AdapterModule
from splice.adapters.methods._input_transform import InputTransform, build_on_linear
from splice.adapters.registry import adapter_method

# PEFT's HRA defaults by HF model_type (the architectures splice tests).


class HRAConfig(AdapterConfig):
    r: int = Field(8, gt=0)
    apply_GS: bool = False
    init_weights: bool = True
    bias: Literal["none"] = "none"


# -- pure math ------------------------------------------------------------------------------


def gram_schmidt(u: Tensor) -> Tensor:
    """Orthonormalise the columns of ``u`` (in×r) in order (classical Gram–Schmidt)."""
    cols: list[Tensor] = []
    for i in range(u.shape[1]):
        v = u[:, i]
        for q in cols:
            v = v - (q @ v) * q
        cols.append(v / v.norm())
    return torch.stack(cols, dim=1)


def householder_product(u: Tensor, apply_gs: bool) -> Tensor:
    """H = H_1 ⋯ H_r (in×in) — or I − 2QQᵀ with Gram–Schmidt — from the columns of u."""
    eye = torch.eye(u.shape[0], dtype=u.dtype, device=u.device)
    if apply_gs:
        q = gram_schmidt(u)
        return eye - 2 * q @ q.T
    un = u / u.norm(dim=0)
    h = eye
    for i in range(u.shape[1]):
        v = un[:, i : i + 1]
        h = h - 2 * (h @ v) @ v.T
    return h


def reflect_rows(x: Tensor, u: Tensor, apply_gs: bool) -> Tensor:
    """x Hᵀ for row vectors x (..., in): H_r first, H_1 last (or x − 2 (x Q) Qᵀ with GS)."""
    if apply_gs:
        q = gram_schmidt(u)
        return x - 2 * (x @ q) @ q.T
    un = u / u.norm(dim=0)
    for i in reversed(range(u.shape[1])):
        v = un[:, i]
        x = x - 2 * (x @ v).unsqueeze(-1) * v
    return x


# -- the layer ------------------------------------------------------------------------------


class HRALinear(InputTransform):
    """HRA on nn.Linear / Conv1D (see the module docstring)."""

    replaces_base = True  # the base layer runs in the adapter's dtype (base_forward)

    def __init__(self, in_features: int, r: int, apply_gs: bool, init: bool, conv1d: bool):
        super().__init__(in_features, conv1d)
        self.apply_gs = apply_gs
        self.hra_u = nn.Parameter(torch.empty(in_features, r))
        self.reset(init)

    @torch.no_grad()
    def reset(self, init: bool) -> None:
        r = self.hra_u.shape[1]
        if init and r % 2 == 0:
            half = torch.empty(self.hra_u.shape[0], r // 2)
            nn.init.kaiming_uniform_(half, a=math.sqrt(5))
            self.hra_u.copy_(half.repeat_interleave(2, dim=1))
            return
        if init:
            warnings.warn(
                f"hra: r={r} is odd, so the paired (identity) initialisation is impossible; "
                "the vectors are random and the model does not start at the base (as PEFT)",
                stacklevel=4,
            )
        nn.init.kaiming_uniform_(self.hra_u, a=math.sqrt(5))

    def transform_input(self, x: Tensor, base: nn.Module) -> Tensor:
        u = self.hra_u
        return reflect_rows(x.to(u.dtype), u, self.apply_gs)

    def base_forward(self, x: Tensor, base: nn.Module) -> Tensor:
        """The base layer on the reflected x with W and b cast to the adapter's dtype, the
        result rounded once to the base's dtype (PEFT computes the whole HRA layer so)."""
        params = {n: p.to(x.dtype) for n, p in base.named_parameters(recurse=False)}
        return torch.func.functional_call(base, params, (x,)).to(base.weight.dtype)

    def input_matrix(self) -> Tensor:
        return householder_product(self.hra_u.float(), self.apply_gs)


@adapter_method(HRAConfig, name="hra", peft_type="HRA")
def build_hra(base: nn.Module, config: HRAConfig, path: str) -> AdapterModule | None:
    def make(in_features: int, conv1d: bool) -> HRALinear:
        return HRALinear(in_features, config.r, config.apply_GS, config.init_weights, conv1d)

    return build_on_linear(base, make)
