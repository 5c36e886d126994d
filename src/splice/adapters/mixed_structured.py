"""Batched mixed-batch kernels for the structured adapters: LoKr (Kronecker ΔW), OFT (block-
diagonal rotation of the input) and HRA (Householder reflections of the input). The stacks are
built and cached by `splice.adapters.mixed_kernels` (same cache, same freshness checks) and
applied by `splice.adapters.mixed_batch`; each row has at most one kernel adapter, with weight
1 (LoKr also takes weighted-set entries, as LoRA does; OFT / HRA in a weighted set run per
segment), and rows without one of a stack's adapters read its neutral slot (zero / identity:
exact, x·1 + Σ 0 and x − 0 change no bit).

LoKr on nn.Linear (out = a·b, in = c·d): ΔW = s W1 ⊗ W2, W1: a×c, W2: b×d (each possibly the
product of its low-rank factors, multiplied once when the stack is built). For one token x
viewed as the c×d matrix X (X[m, n] = x[m·d + n]),

    (ΔW x)[i·b + j] = s Σ_mn W1[i, m] W2[j, n] X[m, n] = s (W1 X W2ᵀ)[i, j]

so the row's update is two small batched products over its positions, with the row's W1, W2
gathered from the stack (s folded into W1): per token min(b·c·(a + d), a·d·(b + c))
multiply-adds instead of out·in for the dense ΔW (which the per-segment path rebuilds at
every call). Chosen over a cached dense ΔW per adapter (one ``bmm`` over gathered out×in
blocks): that would keep out·in floats per adapter and layer (the size of the base weight,
for every adapter loaded) and gather out·in per row; the Kronecker factors are a few hundred
floats. Used when that cost is under the dense out·in (as LoHa's LoRA form; a degenerate
factorization, e.g. a prime dimension, runs per segment), without rank / module dropout in
training.

When W2 is stored factored, W2 = U2 V2 of rank k (PEFT's default for r < max(b, d) / 2), and
k (c·d + a·c + a·b) is below the dense order's cost, the stack keeps U2 and V2 instead:
per token X V2ᵀ (c×k), W1 · (a×k), · U2ᵀ (a×b). r = 8 on a 576×576 layer (24×24 factors):
13.8 k multiply-adds per token instead of 27.6 k, and the tensors moved between the
products (the token axis must sit next to c for W1's product: one copy each way) are k/b of
the activation's size instead of all of it. The last product is accumulated into the
output in place (``baddbmm_``) when every row is computed in the output's dtype.

OFT (`splice.adapters.methods.oft`): x' = x R_bd as row vectors, block j: x'_j = x_j R_j
(k×k blocks, in = nb·k). The stack holds every adapter's blocks, (n+1) × nb × k × k, the last
slot the identity; per row x'_r = x_r R_a(r), then the base layer once on all rows. On CPU, per
run of consecutive rows with one adapter: one ``bmm`` over that adapter's nb blocks, reading
and writing the rows through strided (nb, tokens, k) views (no gather of blocks, no permuted
copies of x; rows without an OFT adapter are copied); elsewhere one einsum over all rows with
each row's blocks gathered (nb·k² = in·k floats per row): one launch instead of one per run.
Caching W R_a per adapter instead would hold a copy of the base weight per adapter (out·in
floats): refused for the same reason as dense LoKr. Not with ``coft`` (it rewrites its
parameter at every forward) or module dropout in training; adapters of different block
sizes get one stack each.

HRA (`splice.adapters.methods.hra`): x' = x Hᵀ with H = H_1 ⋯ H_r, H_i = I − 2 v_i v_iᵀ
(v_i = u_i / ‖u_i‖). In compact WY form H = I − V T Vᵀ, T upper triangular from the recursion
T_1 = [2], T_{k+1} = [[T_k, −2 T_k V_kᵀ v_{k+1}], [0, 2]] (checked against the product of the
reflections in the tests); with Gram–Schmidt H = I − 2 Q Qᵀ. So, with H = I − B Aᵀ,

    x' = x Hᵀ = x − (x A) Bᵀ,      A = V, B = V T   (GS: A = Q, B = 2 Q)

an input-side low-rank update (2·r·in multiply-adds per token instead of r rank-one passes),
stacked per rank bucket like LoRA (zero padding; the neutral slot is zero). HRA runs the base
layer in the adapter's dtype; the kernel is used when that is the base weight's dtype (then
the base layer's own forward computes the same), per segment otherwise.

Memory: LoKr a·c + b·d floats per adapter (the dense factors), OFT in·k, HRA 2·in·R; never a
dense in×in or out×in matrix per adapter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from splice.adapters.layer import AdapterModule
from splice.adapters.methods.hra import HRALinear, gram_schmidt
from splice.adapters.methods.lokr import LoKr
from splice.adapters.methods.oft import OFTLinear

if TYPE_CHECKING:
    from splice.adapters.mixed_kernels import RowSlots


def _training_dropout(module: AdapterModule) -> bool:
    return module.training and bool(
        getattr(module, "rank_dropout", 0) or getattr(module, "module_dropout", 0)
    )


def _kron_shapes(module: LoKr) -> tuple[int, int, int, int]:
    """(a, c, b, d): W1 is a×c, W2 is b×d."""
    w1 = (module.lokr_w1.shape if module.use_w1 else
          (module.lokr_w1_a.shape[0], module.lokr_w1_b.shape[1]))  # fmt: skip
    w2 = (module.lokr_w2.shape if module.use_w2 else
          (module.lokr_w2_a.shape[0], module.lokr_w2_b.shape[1]))  # fmt: skip
    return w1[0], w1[1], w2[0], w2[1]


def kron_cost(a: int, c: int, b: int, d: int) -> tuple[int, bool]:
    """Multiply-adds per token of W1 X W2ᵀ, and whether W1 goes first (the cheaper order)."""
    w2_first, w1_first = b * c * (d + a), a * d * (c + b)
    return min(w2_first, w1_first), w1_first < w2_first


def factored_cost(a: int, c: int, b: int, d: int, k: int) -> int:
    """Multiply-adds per token of ((X V2ᵀ)ᵀ W1ᵀ)ᵀ U2ᵀ = W1 X W2ᵀ with W2 = U2 V2 of rank k."""
    return k * (c * d + a * c + a * b)


def _w2_rank(module: LoKr, shapes: tuple[int, int, int, int]) -> int | None:
    """The rank k of W2 = U2 V2 when it is stored factored and applying the factors is
    cheaper than the dense W2 (`kron_cost`); None otherwise."""
    if module.use_w2 or module.effective:
        return None
    k = module.lokr_w2_a.shape[1]
    return k if factored_cost(*shapes, k) < kron_cost(*shapes)[0] else None


def structured_kind(module: AdapterModule, base: nn.Module) -> str | None:
    """The kernel kind (lokr, oft, hra) of ``module``, None: per segment (module docstring)."""
    if isinstance(module, LoKr):
        if not isinstance(base, nn.Linear) or module.effective or _training_dropout(module):
            return None
        shapes = _kron_shapes(module)
        k = _w2_rank(module, shapes)
        cost = kron_cost(*shapes)[0] if k is None else factored_cost(*shapes, k)
        return "lokr" if cost < base.in_features * base.out_features else None
    if isinstance(module, OFTLinear):
        dropout = module.training and module.dropout_p > 0
        return None if module.coft or dropout else "oft"
    if isinstance(module, HRALinear):
        return "hra" if module.hra_u.dtype == base.weight.dtype else None
    return None


@dataclass
class KronStack:
    """LoKr adapters of one factor shape: W1 (n+1) × a × c (s folded in), W2 (n+1) × b × d;
    the last slot is zero. With ``u2`` (W2 stored as U2 V2 of rank k, `factored_cost`):
    ``w2`` holds V2, (n+1) × k × d, and ``u2`` U2, (n+1) × b × k; ``w1_first`` is unused."""

    slots: dict[str, int]
    w1: Tensor
    w2: Tensor
    w1_first: bool
    u2: Tensor | None = None


@dataclass
class BlockStack:
    """OFT adapters of one block size: (n+1) × nb × k × k, the last slot the identity."""

    slots: dict[str, int]
    blocks: Tensor


@dataclass
class ReflectStack:
    """HRA adapters of one rank bucket: x' = x − (x A) Bᵀ, A and B (n+1) × in × R (zero
    padded; the last slot zero)."""

    slots: dict[str, int]
    a: Tensor
    b: Tensor


def _slots(names: list[str]) -> dict[str, int]:
    return {n: i for i, n in enumerate(names)}


def build_kron(modules: dict[str, LoKr]) -> list[KronStack]:
    """One stack per factor shape and W2 rank (None: W2 dense; `_w2_rank`)."""
    groups: dict[tuple[tuple[int, int, int, int], int | None], list[str]] = {}
    for n, m in modules.items():
        shapes = _kron_shapes(m)
        groups.setdefault((shapes, _w2_rank(m, shapes)), []).append(n)
    stacks = []
    for (shapes, k), names in groups.items():
        pairs = [modules[n].factors() for n in names]
        w1 = [w1 * modules[n].scaling for n, (w1, _) in zip(names, pairs, strict=True)]
        w2 = [
            w2 if k is None else modules[n].lokr_w2_b
            for n, (_, w2) in zip(names, pairs, strict=True)
        ]
        u2 = None if k is None else [modules[n].lokr_w2_a for n in names]
        for t in (w1, w2, u2):
            if t is not None:
                t.append(torch.zeros_like(t[0]))
        stacks.append(
            KronStack(
                _slots(names),
                torch.stack(w1),
                torch.stack(w2),
                kron_cost(*shapes)[1],
                None if u2 is None else torch.stack(u2),
            )
        )
    return stacks


def build_blocks(modules: dict[str, OFTLinear]) -> list[BlockStack]:
    groups: dict[int, list[str]] = {}
    for n, m in modules.items():
        groups.setdefault(m.block_size, []).append(n)
    stacks = []
    for _, names in sorted(groups.items()):
        blocks = [modules[n].rotation_blocks() for n in names]
        eye = torch.eye(blocks[0].shape[-1], dtype=blocks[0].dtype, device=blocks[0].device)
        blocks.append(eye.expand_as(blocks[0]))
        stacks.append(BlockStack(_slots(names), torch.stack(blocks).contiguous()))
    return stacks


def reflection_form(u: Tensor, apply_gs: bool) -> tuple[Tensor, Tensor]:
    """(A, B), in×r each, with H_1 ⋯ H_r = I − B Aᵀ (module docstring), in float64."""
    u = u.double()
    if apply_gs:
        q = gram_schmidt(u)
        return q, 2 * q
    v = u / u.norm(dim=0)
    r = v.shape[1]
    t = torch.zeros(r, r, dtype=v.dtype, device=v.device)
    for k in range(r):
        t[:k, k] = -2 * t[:k, :k] @ (v[:, :k].T @ v[:, k])
        t[k, k] = 2
    return v, v @ t


def build_reflect(
    modules: dict[str, HRALinear], rank_bucket: Callable[[int], int]
) -> list[ReflectStack]:
    """One stack per ``rank_bucket(r)`` (LoRA's buckets)."""
    groups: dict[int, list[str]] = {}
    for n, m in modules.items():
        groups.setdefault(rank_bucket(m.hra_u.shape[1]), []).append(n)
    stacks = []
    for rank, names in sorted(groups.items()):
        u0 = modules[names[0]].hra_u
        a = u0.new_zeros(len(names) + 1, u0.shape[0], rank)
        b = torch.zeros_like(a)
        for i, n in enumerate(names):
            m = modules[n]
            a_n, b_n = reflection_form(m.hra_u, m.apply_gs)
            a[i, :, : a_n.shape[1]] = a_n
            b[i, :, : b_n.shape[1]] = b_n
        stacks.append(ReflectStack(_slots(names), a, b))
    return stacks


# -- applying ----------------------------------------------------------------------------------


def kron_update(x: Tensor, stack: KronStack, rs: RowSlots, into: Tensor | None = None) -> Tensor:
    """(rows, positions, out): s W1 X W2ᵀ per token of the covered rows (all rows when
    ``rs.rows`` is None), the row's factors gathered. With ``into`` (rows, positions, out),
    contiguous, in the stack's dtype: the update is accumulated into it and it is returned.
    One adapter on every row: all positions as one row (no gather, larger products)."""
    if rs.uniform is not None and rs.rows is None:
        one = slice(rs.uniform, rs.uniform + 1)
        u2 = None if stack.u2 is None else stack.u2[one]
        flat = None if into is None else into.view(1, -1, into.shape[-1])
        x1 = x.reshape(1, -1, x.shape[-1])
        got = _kron(x1, stack.w1[one], stack.w2[one], u2, stack.w1_first, flat)
        return got.view(x.shape[0], -1, got.shape[-1])
    if rs.rows is not None:
        x = x.index_select(0, rs.rows)
    u2 = None if stack.u2 is None else stack.u2.index_select(0, rs.slots)
    w1, w2 = stack.w1.index_select(0, rs.slots), stack.w2.index_select(0, rs.slots)
    return _kron(x, w1, w2, u2, stack.w1_first, into)


def _kron(x: Tensor, w1: Tensor, w2: Tensor, u2: Tensor | None, w1_first: bool,
          into: Tensor | None) -> Tensor:  # fmt: skip
    """`kron_update` with each row's factors given (``w2``: V2 when ``u2`` is given).

    The products contract d with a plain ``bmm`` over (positions·c) × d; contracting c needs
    the token axis moved next to it (one copy of a tensor the size of the narrower side):
    W2 first: X W2ᵀ (or X V2ᵀ, k columns), moved, W1 ·, moved back, then (· U2ᵀ) as the last
    ``bmm``, accumulated in place; W1 first: X moved, W1 ·, moved back, · W2ᵀ last."""
    rows, (a, c), d = w1.shape[0], w1.shape[1:], w2.shape[2]
    x3 = x.contiguous().to(w1.dtype).view(rows, -1, d)  # (rows, L·c, d)
    length = x3.shape[1] // c
    if u2 is None and w1_first:  # Z = W1 X per token (a×d), then Z W2ᵀ
        xt = x3.view(rows, length, c, d).transpose(1, 2).reshape(rows, c, length * d)
        z = torch.bmm(w1, xt).view(rows, a, length, d).transpose(1, 2)
        z, last = z.reshape(rows, length * a, d), w2.transpose(1, 2)
    else:  # T = X W2ᵀ (or X V2ᵀ) per token (c×k), then W1 T (then · U2ᵀ)
        k = w2.shape[1]
        t = torch.bmm(x3, w2.transpose(1, 2)).view(rows, length, c, k)
        t = t.transpose(1, 2).reshape(rows, c, length * k)
        z = torch.bmm(w1, t).view(rows, a, length, k).transpose(1, 2)  # (rows, L, a, k)
        if u2 is None:  # k = b: z is the update, token axis strided
            if into is None:
                return z.reshape(rows, length, a * k)
            into.view(rows, length, a, k).add_(z)
            return into
        z, last = z.reshape(rows, length * a, k), u2.transpose(1, 2)
    b = last.shape[2]
    if into is None:
        return torch.bmm(z, last).view(rows, length, a * b)
    into.view(rows, length * a, b).baddbmm_(z, last)
    return into


def _transform_rows(x: Tensor, rs: RowSlots, fn) -> Tensor:
    """``x`` with ``fn(rows of x, slots)`` on the covered rows, in x's dtype."""
    if rs.rows is None:
        return fn(x, rs.slots, rs.uniform).to(x.dtype)
    out = x.clone()
    out.index_copy_(0, rs.rows, fn(x.index_select(0, rs.rows), rs.slots, None).to(x.dtype))
    return out


def rotate_input(x: Tensor, stack: BlockStack, rs: RowSlots) -> Tensor:
    """OFT: x_r R_a(r) per row, block by block (the base layer's input, in x's dtype).

    On CPU, per run of consecutive rows with one adapter (`RowSlots.runs`): one ``bmm`` over
    the nb blocks of that adapter's stack slot (no gather), reading x and writing the result
    through strided views ((nb, rows·L, k) with row stride ``in``: BLAS takes them as they
    are, no copy either way); runs of rows without an OFT adapter are copied. Elsewhere (many
    small launches would cost more than the copies) one gathered einsum over all rows."""
    if x.is_cpu and rs.runs and x.numel():
        return _rotate_runs(x, stack, rs.runs)

    def rotate(xs: Tensor, slots: Tensor, uniform: int | None) -> Tensor:
        blocks = stack.blocks
        nb, k = blocks.shape[1], blocks.shape[2]
        x4 = xs.contiguous().to(blocks.dtype).view(xs.shape[0], -1, nb, k)
        if uniform is not None:
            y = torch.einsum("blrk,rkc->blrc", x4, blocks[uniform])
        else:
            y = torch.einsum("blrk,brkc->blrc", x4, blocks.index_select(0, slots))
        return y.reshape(xs.shape)

    return _transform_rows(x, rs, rotate)


def _rotate_runs(x: Tensor, stack: BlockStack, runs: list[tuple[int, int, int]]) -> Tensor:
    blocks = stack.blocks
    neutral, nb, k = blocks.shape[0] - 1, blocks.shape[1], blocks.shape[2]
    xs = x.contiguous().to(blocks.dtype)
    y = torch.empty_like(xs)
    for start, stop, slot in runs:
        if slot == neutral:
            y[start:stop] = xs[start:stop]
            continue
        # the run's tokens as (nb, tokens, k): element (j, t, ·) at t·in + j·k
        x_run = xs[start:stop].view(-1, nb, k).transpose(0, 1)
        torch.bmm(x_run, blocks[slot], out=y[start:stop].view(-1, nb, k).transpose(0, 1))
    return y.to(x.dtype)


def reflect_input(x: Tensor, stack: ReflectStack, rs: RowSlots) -> Tensor:
    """HRA: x_r − (x_r A) Bᵀ per row (the base layer's input, in x's dtype)."""

    def reflect(xs: Tensor, slots: Tensor, uniform: int | None) -> Tensor:
        x3 = xs.to(stack.a.dtype).reshape(xs.shape[0], -1, xs.shape[-1])
        if uniform is not None:
            a, b = stack.a[uniform], stack.b[uniform]
            y = torch.addmm(x3.view(-1, x3.shape[-1]), x3.view(-1, x3.shape[-1]) @ a, b.T,
                            alpha=-1)  # fmt: skip
            return y.view(xs.shape)
        a, b = stack.a.index_select(0, slots), stack.b.index_select(0, slots)
        return torch.baddbmm(x3, torch.bmm(x3, a), b.transpose(1, 2), alpha=-1).view(xs.shape)

    return _transform_rows(x, rs, reflect)
