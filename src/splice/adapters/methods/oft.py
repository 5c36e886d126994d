"""OFT (Qiu et al. 2023, "Controlling Text-to-Image Diffusion by Orthogonal Finetuning"),
in PEFT 0.21's current form (the format PEFT writes since 0.14; older ``oft_r`` checkpoints
are not readable by PEFT 0.21 either).

A linear layer y = W x + b gets a block-diagonal orthogonal R acting on its *input*:

    x' = R x   (per block j of size k:  x'_j = x_j R_jᵀ… written row-wise: x'_j = x_j · R_j)
    y  = W x' + b,     so   W' = W Rᵀ_bd   and   ΔW = W (R_bdᵀ − I)   given the base W

where R_bd = diag(R_1, …, R_r) (r blocks of size k, r·k = in_features). PEFT rotates the
input (row vectors times R_j), so a merged PEFT OFT layer holds W R_bdᵀ; splice does the same.

Each block comes from a skew-symmetric Q_j whose strict upper triangle is the trainable
vector (k(k−1)/2 entries, row-major ``triu_indices`` order), Q_j = U − Uᵀ:
- ``use_cayley_neumann=True`` (PEFT's default): the truncated series PEFT uses,
  R = I + 2Q + 2Q² + … + 2Q^(m−1) + Q^m with m = max(3, n−1) for n = num_cayley_neumann_terms
  ≥ 3 (n = 2: I + 2Q; n = 1: I). It approximates (I + Q)(I − Q)⁻¹.
- ``use_cayley_neumann=False``: the exact Cayley transform PEFT computes,
  R = (I − Q)(I + Q)⁻¹ — note the opposite sign convention of the series (PEFT's choice;
  splice follows PEFT so adapters move between the two unchanged).

Options (PEFT's names and defaults): exactly one of ``r`` (number of blocks) and
``oft_block_size`` (block size, default 32) is non-zero; when it does not divide
in_features, PEFT silently moves it to the nearest divisor (ties to the smaller one) and so
does splice, with a warning. ``block_share``: one block shared by all r blocks (one row of
parameters). ``coft`` (constrained OFT): before every use, each block's Q is projected onto
the Frobenius ball ‖Q‖ ≤ eps/√(rows), written back into the parameter (as PEFT does).
``module_dropout`` (multiplicative dropout, the OFT paper's): in training, ⌊p·r⌋ randomly
chosen blocks are replaced by I. PEFT 0.21 builds this layer but never calls it in its
Linear forward; splice applies it (training only, so inference parity is unaffected).
``init_weights=True``: Q = 0, so R = I and the adapted model starts equal to the base;
False: N(0, 0.1²) (tests).

Dtypes as PEFT: x is rotated in the adapter's dtype (float32 on a bf16 base) and rounded
to its own dtype before the base layer.

Supports nn.Linear (as PEFT) and GPT-2 Conv1D (splice only: W stored in×out, so
ΔW = (R_bd − I) W there; PEFT cannot load such an adapter). ``fan_in_fan_out`` is accepted
for PEFT's config but has no effect: splice recognises Conv1D by its type (PEFT resets the
flag to False on nn.Linear). Saved key: ``oft_R.weight``,
shape (r, k(k−1)/2), or (1, …) with block_share.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from splice.adapters.config import AdapterConfig, AdapterConfigError
from splice.adapters.layer import AdapterModule
from splice.adapters.methods._input_transform import InputTransform, build_on_linear
from splice.adapters.registry import adapter_method

# PEFT's OFT defaults by HF model_type (the architectures splice tests).


class OFTConfig(AdapterConfig):
    r: int = Field(0, ge=0)
    oft_block_size: int = Field(32, ge=0)
    module_dropout: float = Field(0.0, ge=0, lt=1)
    fan_in_fan_out: bool = False
    bias: Literal["none"] = "none"
    init_weights: bool = True
    coft: bool = False
    eps: float = Field(6e-5, gt=0)
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = Field(5, ge=1)

    peft_inert_defaults: ClassVar[dict[str, Any]] = {}

    @model_validator(mode="after")
    def _one_of_r_and_block_size(self) -> OFTConfig:
        if (self.r == 0) == (self.oft_block_size == 0):
            raise AdapterConfigError(
                f"oft: set exactly one of r ({self.r}) and oft_block_size "
                f"({self.oft_block_size}) to a non-zero value (r × oft_block_size = in_features)"
            )
        return self


# -- pure math ------------------------------------------------------------------------------


def skew_symmetric(vec: Tensor, block_size: int) -> Tensor:
    """(b, k(k−1)/2) -> (b, k, k): strict upper triangle filled row-major, Q = U − Uᵀ."""
    rows, cols = torch.triu_indices(block_size, block_size, 1, device=vec.device)
    u = vec.new_zeros(vec.shape[0], block_size, block_size)
    u[:, rows, cols] = vec
    return u - u.transpose(-2, -1)


def cayley(q: Tensor, neumann: bool = True, terms: int = 5) -> Tensor:
    """Orthogonal blocks from skew-symmetric ``q`` (b, k, k), PEFT's conventions (see the
    module docstring): the truncated series, or the exact (I − Q)(I + Q)⁻¹."""
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device).expand_as(q)
    if not neumann:
        return torch.linalg.solve(eye + q, eye - q, left=False)
    r = eye.clone()
    if terms == 1:
        return r
    r = r + 2 * q
    if terms == 2:
        return r
    top = max(3, terms - 1)
    power = q
    for _ in range(2, top):
        power = power @ q
        r = r + 2 * power
    return r + power @ q


def coft_project(vec: Tensor, block_size: int, eps: float) -> Tensor:
    """Constrained OFT: scale each block's Q onto ‖Q‖_F ≤ eps/√b (b = rows of ``vec``);
    blocks already inside are unchanged. Returns the upper-triangle vectors."""
    q = skew_symmetric(vec, block_size)
    bound = eps / (vec.shape[0] ** 0.5)
    norm = torch.linalg.matrix_norm(q, keepdim=True)
    q = torch.where(norm <= bound, q, q * (bound / norm))
    rows, cols = torch.triu_indices(block_size, block_size, 1, device=vec.device)
    return q[:, rows, cols]


def multiplicative_dropout(blocks: Tensor, p: float) -> Tensor:
    """Replace ⌊p·D⌋ randomly chosen blocks of (D, k, k) by the identity."""
    d, k, _ = blocks.shape
    n_drop = int(p * d)
    if n_drop == 0 or d == 1:
        return blocks
    mask = torch.zeros(d, 1, 1, dtype=blocks.dtype, device=blocks.device)
    mask[torch.randperm(d, device=blocks.device)[:n_drop]] = 1
    eye = torch.eye(k, dtype=blocks.dtype, device=blocks.device)
    return (1 - mask) * blocks + mask * eye


def adjust_to_divisor(n: int, value: int) -> int:
    """PEFT's fix-up for an r / block size that does not divide n: the nearest divisor of n
    (the smaller one on a tie); values ≥ n become n."""
    if value >= n:
        return n
    higher = value
    while higher <= n and n % higher:
        higher += 1
    lower = value
    while lower > 1 and n % lower:
        lower -= 1
    return lower if value - lower <= higher - value else higher


def block_layout(in_features: int, r: int, block_size: int, where: str) -> tuple[int, int]:
    """(number of blocks, block size) for a layer, PEFT's rules (one of r, block_size is 0)."""
    if r == 0:
        if in_features % block_size:
            new = adjust_to_divisor(in_features, block_size)
            warnings.warn(
                f"{where}: oft_block_size {block_size} does not divide in_features "
                f"{in_features}; using {new} (as PEFT does)",
                stacklevel=3,
            )
            block_size = new
        return in_features // block_size, block_size
    if in_features % r:
        new = adjust_to_divisor(in_features, r)
        warnings.warn(
            f"{where}: r {r} does not divide in_features {in_features}; using {new} (as PEFT does)",
            stacklevel=3,
        )
        r = new
    return r, in_features // r


# -- the layer ------------------------------------------------------------------------------


class OFTRotation(nn.Module):
    """Holds the trainable upper triangles (PEFT's ``oft_R`` module, key ``weight``)."""

    def __init__(self, rows: int, n_elements: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(rows, n_elements))


class OFTLinear(InputTransform):
    """OFT on nn.Linear / Conv1D: rotates the input by the block-diagonal R (docstring above)."""

    def __init__(
        self, in_features: int, blocks: int, block_size: int, config: OFTConfig, conv1d: bool
    ) -> None:
        super().__init__(in_features, conv1d)
        self.blocks = blocks
        self.block_size = block_size
        self.block_share = config.block_share
        self.coft = config.coft
        self.eps = config.eps
        self.neumann = config.use_cayley_neumann
        self.terms = config.num_cayley_neumann_terms
        self.dropout_p = config.module_dropout
        n_elements = block_size * (block_size - 1) // 2
        self.oft_R = OFTRotation(1 if self.block_share else blocks, n_elements)
        if not config.init_weights:
            nn.init.normal_(self.oft_R.weight, mean=0.0, std=0.1)

    def rotation_blocks(self) -> Tensor:
        """The r orthogonal blocks (r, k, k) (coft projects the parameter first, in place)."""
        weight = self.oft_R.weight
        if self.coft:
            with torch.no_grad():
                weight.copy_(coft_project(weight, self.block_size, self.eps))
        blocks = cayley(skew_symmetric(weight, self.block_size), self.neumann, self.terms)
        if self.block_share:
            blocks = blocks.expand(self.blocks, -1, -1)
        return blocks

    def rotation(self) -> Tensor:
        """R_bd (in, in), float32."""
        return torch.block_diag(*self.rotation_blocks().float())

    def transform_input(self, x: Tensor, base: nn.Module) -> Tensor:
        blocks = self.rotation_blocks()
        if self.training and self.dropout_p > 0:
            blocks = multiplicative_dropout(blocks, self.dropout_p)
        xr = x.to(blocks.dtype).reshape(*x.shape[:-1], self.blocks, self.block_size)
        out = torch.einsum("...rk,rkc->...rc", xr, blocks)
        return out.reshape(x.shape)

    def input_matrix(self) -> Tensor:
        """R_bdᵀ: the input is rotated as a row vector, x R_bd (module docstring)."""
        return self.rotation().float().T


@adapter_method(OFTConfig, name="oft", peft_type="OFT")
def build_oft(base: nn.Module, config: OFTConfig, path: str) -> AdapterModule | None:
    def make(in_features: int, conv1d: bool) -> OFTLinear:
        blocks, size = block_layout(in_features, config.r, config.oft_block_size, path)
        if size < 2:
            raise AdapterConfigError(
                f"oft: '{path}': block size {size} (in_features {in_features}, r {blocks}) "
                "leaves nothing to rotate; use fewer, larger blocks"
            )
        return OFTLinear(in_features, blocks, size, config, conv1d)

    return build_on_linear(base, make)
