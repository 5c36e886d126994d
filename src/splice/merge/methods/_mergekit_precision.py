"""mergekit 0.1.5's arithmetic in float16 / bfloat16 (mergekit dialect only).

With ``dtype: bfloat16`` or ``float16`` mergekit casts every input to that dtype and does
the merge arithmetic there, so every intermediate rounding (and, through the rounded sums,
which sign wins an election) is part of its result. The mergekit dialect promises
mergekit's tensors, so for those two dtypes the methods below repeat its operations one for
one: the same torch ops on the same dtypes, in the same order.

- Task-vector combine (task arithmetic, TIES, breadcrumbs, DARE, DELLA after their
  sparsifiers): the deltas are stacked into one tensor [n, ...]; the weights become a tensor
  *of the compute dtype* (so 0.8 is bf16's 0.80078125); ``v = deltas * w``; sums are
  ``sum(dim=0)`` over the stack (torch accumulates a reduced-precision sum in float32 and
  rounds once, which a chain of in-place adds would not); the TIES election is
  ``sign(Σ v) >= 0`` with the agreeing mask ``sign(v_i) == s`` and the divisor
  ``Σ w_i·mask_i`` in the compute dtype (0 -> 1); without consensus the divisor is
  ``Σ w_i`` (|.| < 1e-8 -> 1). Then ``/ divisor`` (normalize), ``* λ`` (λ ≠ 1), ``base +``.
  Peak memory: one stacked copy of the n deltas (as in mergekit) on top of the inputs.
  In bfloat16 on the CPU with the compiled extension built, the same roundings are done
  entry by entry in one pass, in place in the base, without the stacked copy
  (`_ties_kernel.gta_bf16`); float16 and the fallback use the torch ops.
- linear and SLERP: mergekit upcasts to float32 inside the kernel and rounds the result
  once, so these do the same (float32 weights and ``addcmul_``; SLERP's norms over chunks of
  2^20 entries, the dot of the normalised vectors, ``coef_a·a + coef_b·b``).
- Model Stock: ``t·mean(θ_i) + (1 − t)·θ_0`` in the compute dtype, with the mean as
  ``(θ_1 + θ_2 + …) / n`` — mergekit's form, not splice's ``θ_0 + t·mean(δ_i)`` (equal in
  exact arithmetic, not in bf16).
- SLERP's dot and Model Stock's dots and float16 norms are sums over a whole tensor, which
  torch splits over its intra-op threads: they are added in the order torch uses with
  mergekit's thread count (`splice.merge.reductions`), whatever splice's own.

float32 and float64 keep splice's own kernels (bit-identical to mergekit in float32 for
the task-vector methods; within 1e-6 for the others), so their pinned outputs do not move.
The splice dialect always uses its own kernels, whatever the dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from splice.io import scratch
from splice.merge.methods._common import kernel_accepts, own_inputs
from splice.merge.reductions import mergekit_threads, norm_last, sum_last
from splice.merge.registry import MergeContext

try:
    from splice.merge.methods import _ties_kernel
except ImportError:  # built without a C compiler: the torch ops
    _ties_kernel = None
try:
    from splice.merge.methods import _mergekit_kernel
except ImportError:
    _mergekit_kernel = None

LOW_PRECISION = (torch.float16, torch.bfloat16)
SLERP_CHUNK = 1024 * 1024  # entries per chunk of mergekit's SLERP statistics
Consensus = Literal["sum", "count"]


def mergekit_low_precision(ctx: MergeContext, dtype: torch.dtype) -> bool:
    """True when the mergekit dialect computes in float16 / bfloat16: mergekit's arithmetic."""
    return ctx.dialect == "mergekit" and dtype in LOW_PRECISION


def mergekit_arithmetic(ctx: MergeContext, dtype: torch.dtype) -> bool:
    """True when the mergekit dialect computes in float16, bfloat16 or float32: the methods
    whose float32 statistics mergekit takes its own way (SLERP's chunked norms and float32
    coefficients, Model Stock's and Karcher's operation order) repeat mergekit's ops then
    too, so that float32 recipes give mergekit's bits as well."""
    return ctx.dialect == "mergekit" and dtype in (*LOW_PRECISION, torch.float32)


def gta_combine(
    base: Tensor,
    deltas: Sequence[Tensor],
    weight: Sequence[float],
    *,
    consensus: Consensus | None,
    normalize: bool,
    lambda_: float,
) -> Tensor:
    """mergekit's generalized task arithmetic after sparsification, in ``base.dtype``."""
    if not deltas:
        return base
    dtype = base.dtype
    if _fused_bf16_applies(base, deltas):
        assert _ties_kernel is not None
        codes = {None: 0, "sum": 1, "count": 2}
        rounded = torch.tensor(list(weight), dtype=dtype).float().tolist()
        _ties_kernel.gta_bf16(
            base.view(torch.int16).numpy(),
            [d.view(torch.int16).numpy() for d in deltas],
            rounded,
            codes[consensus],
            normalize,
            lambda_,
        )
        return base
    stacked = torch.stack(list(deltas))
    weights = torch.tensor(list(weight), dtype=dtype, device=base.device)
    weights = weights.reshape(-1, *([1] * base.dim()))
    stacked.mul_(weights)
    if consensus is not None:
        agree = gta_agreement(stacked, consensus)
        mixed = stacked.mul_(agree).sum(dim=0)  # in place: the same products
        divisor = (weights * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = stacked.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    del stacked
    if normalize:
        mixed /= divisor
    if lambda_ != 1:
        mixed *= lambda_
    return (base + mixed).to(dtype)


FUSED_MAX_MODELS = 8  # torch's dim-0 sum of a few rows adds them in order; kept small


def _fused_bf16_applies(base: Tensor, deltas: Sequence[Tensor]) -> bool:
    """Whether `gta_combine` can run as the compiled bfloat16 kernel (`_ties_kernel`): the
    same roundings, entry by entry, in one pass and without the stacked copy."""
    return _ties_kernel is not None and kernel_accepts(
        base, deltas, torch.bfloat16, FUSED_MAX_MODELS
    )


def gta_agreement(stacked: Tensor, consensus: Consensus) -> Tensor:
    """mergekit's sign election over the stacked weighted deltas: s = sign(Σ v_i) >= 0 (or
    of Σ sign(v_i)) as ±1 in their dtype; returns the bool mask sign(v_i) == s [n, ...]."""
    dtype = stacked.dtype
    votes = stacked.sum(dim=0) if consensus == "sum" else stacked.sign().sum(dim=0)
    majority = (votes >= 0).to(dtype) * 2 - 1
    del votes
    # sign(v_i) == s, one model at a time (the same mask as mergekit's stacked compare,
    # without a stacked copy of the signs)
    agree = torch.empty(stacked.shape, dtype=torch.bool, device=stacked.device)
    for v, a in zip(stacked, agree, strict=True):
        torch.eq(v.sign(), majority, out=a)
    return agree


def linear_float32(tensors: Sequence[Tensor], weight: Sequence[float], normalize: bool) -> Tensor:
    """mergekit's linear kernel: Σ w_i θ_i [/ Σ w_i] accumulated in float32 with
    ``addcmul_``, rounded once to the inputs' dtype."""
    first = tensors[0]
    w = torch.tensor(list(weight), dtype=torch.float32, device=first.device)
    shape = (1,) * first.dim()
    result = torch.zeros_like(first, dtype=torch.float32)
    for t, c in zip(tensors, w.unbind(0), strict=True):
        result.addcmul_(t, c.reshape(shape))
    if normalize:
        result.div_(w.sum().reshape(shape))
    return result.to(first.dtype)


def slerp_float32(base: Tensor, other: Tensor, t: float, eps: float = 1e-8) -> Tensor:
    """mergekit's SLERP kernel for one tensor: float32 statistics over chunks, rounded once.

    |a| is the norm of the chunk norms; the dot is taken between a/|a| and b/|b| (norms
    <= eps count as 1), summed per chunk then over chunks, clamped to [-1, 1]; |dot| >
    0.9995 interpolates linearly.

    Every step is per chunk of `SLERP_CHUNK` entries (mergekit's own chunks), so nothing the
    size of the tensor is made: each chunk's float32 temporaries (the cast of a 16-bit
    chunk, the normalised chunks, the weighted ones) are written into two chunk buffers
    taken once per tensor (`splice.io.scratch`: pages already in memory while a merge
    runs), where a fresh temporary per chunk was a page fault per 4 KB (the 16-bit SLERP's
    system time). The same ops on the same values: the same bits. The result is written
    over ``base``, which the registry lets a method modify. The final combination is
    elementwise, so chunk by chunk gives its bits.
    """
    f32 = torch.float32
    a, b = base.reshape(1, -1), other.reshape(1, -1)
    tt = torch.tensor([[t]], dtype=f32, device=base.device)
    if a.shape[1] == 0:
        return ((1 - tt) * a + tt * b).reshape(base.shape).to(base.dtype)
    starts = range(0, a.shape[1], SLERP_CHUNK)
    width = min(SLERP_CHUNK, a.shape[1])
    buf_a = scratch.empty((1, width), f32, base.device)
    buf_b = scratch.empty((1, width), f32, base.device)

    def part(x: Tensor, s: int) -> Tensor:
        return x[:, s : s + SLERP_CHUNK]

    def as_f32(x: Tensor, s: int, buf: Tensor) -> Tensor:
        """The chunk at ``s`` in float32: a view when ``x`` is float32, else cast into buf."""
        chunk = part(x, s)
        return chunk if chunk.dtype == f32 else buf[:, : chunk.shape[1]].copy_(chunk)

    def norm(x: Tensor) -> Tensor:
        parts = [torch.linalg.vector_norm(as_f32(x, s, buf_a), dim=1, keepdim=True) for s in starts]
        return torch.linalg.vector_norm(torch.stack(parts), dim=0)

    def scaled(x: Tensor, s: int, by: Tensor, buf: Tensor, op: Callable[..., Tensor]) -> Tensor:
        """op(chunk of x in float32, by) into ``buf``. A 16-bit chunk is cast into it first
        (torch would cast a mixed-dtype input into a fresh temporary)."""
        chunk, out = part(x, s), buf[:, : part(x, s).shape[1]]
        return op(chunk if chunk.dtype == f32 else out.copy_(chunk), by, out=out)

    def step(s: int, by_a: Tensor, by_b: Tensor, op: Callable[..., Tensor], join: str) -> Tensor:
        """op(a, by_a) joined with op(b, by_b) over the chunk at ``s``, in buf_a: the dot's
        product (div, then ``mul_``) or the mix (mul, then ``add_``)."""
        if kernel is None:
            return getattr(scaled(a, s, by_a, buf_a, op), join)(scaled(b, s, by_b, buf_b, op))
        ca, cb = as_f32(a, s, buf_a), as_f32(b, s, buf_b)
        out = buf_a[:, : ca.shape[1]]
        compiled = kernel.slerp_product if join == "mul_" else kernel.slerp_mix
        compiled(out.numpy(), ca.numpy(), cb.numpy(), float(by_a), float(by_b))
        return out

    # float32 on the CPU with the extension built: each chunk's two elementwise steps are one
    # compiled pass each (`_mergekit_kernel`, torch's float32 operations in order)
    kernel = _mergekit_kernel if base.device.type == "cpu" else None
    norm_a, norm_b = norm(a), norm(b)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    # the dot's reduction order depends on mergekit's thread count (splice.merge.reductions)
    threads = mergekit_threads()
    dots = [
        sum_last(step(s, norm_a, norm_b, torch.div, "mul_"), threads).reshape(1, 1) for s in starts
    ]
    dot = torch.stack(dots).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > 0.9995
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(linear, tt, torch.sin(tt * theta) / sin_theta)
    for s in starts:
        part(a, s).copy_(step(s, coef_a, coef_b, torch.mul, "add_"))  # rounded to a's dtype
    return a.reshape(base.shape)


def model_stock_in_dtype(base: Tensor, tensors: Sequence[Tensor], filter_wise: bool) -> Tensor:
    """mergekit's Model Stock in the inputs' dtype: t·mean(θ_i) + (1 − t)·θ_0, with t from
    the mean pairwise cosine of the task vectors (per row when ``filter_wise``).

    mergekit's operations in its order (θ_1 + θ_2 + …, / n, θ_i − θ_0, the norms, the
    pairwise dots, t·avg + (1 − t)·θ_0), each done in place where mergekit makes a new
    tensor (the same kernel, the same bits): the sum of the θ_i first, then the task vectors
    overwrite the inputs (the registry lets a method modify them; `own_inputs` copies one
    that shares the base's storage), one buffer holds each pairwise product, and the base
    becomes (1 − t)·θ_0. Whole-tensor memory: the inputs + 2 tensors (mergekit's: 2n + 3),
    both scratch tensors (`splice.io.scratch`: reused pages while a merge runs).

    float32 on the CPU with the extension built: the average with the task vectors, and the
    final interpolation, are one compiled pass each (`_mergekit_kernel`: the same float32
    operations in the same order, so the same bits); the norms and dots stay torch's.
    """
    if filter_wise:
        w0 = base.unsqueeze(0) if base.dim() == 1 else base
        ws = [w.unsqueeze(0) if w.dim() == 1 else w for w in own_inputs(base, tensors)]
    else:
        w0, ws = base.reshape(-1), [w.reshape(-1) for w in own_inputs(base, tensors)]
    n = len(ws)
    average = scratch.empty(w0.shape, w0.dtype, w0.device)
    fused = (
        _mergekit_kernel is not None
        and w0.dim() >= 1
        and w0.numel() > 0
        and kernel_accepts(w0, ws, torch.float32, 64)
    )
    if fused:
        assert _mergekit_kernel is not None
        _mergekit_kernel.average_offsets(average.numpy(), w0.numpy(), [w.numpy() for w in ws])
        offsets = ws
    else:
        torch.add(ws[0], ws[1], out=average)
        for w in ws[2:]:
            average.add_(w)
        average.div_(n)
        offsets = [w.sub_(w0) for w in ws]
    threads = mergekit_threads()  # the reductions' order depends on it (splice.merge.reductions)
    norms = [norm_last(d, threads) for d in offsets]
    product = scratch.empty(w0.shape, w0.dtype, w0.device)
    cosines = []
    for i, da in enumerate(offsets):
        for j in range(i + 1, n):
            norm_product = norms[i] * norms[j]
            dot = sum_last(torch.mul(da, offsets[j], out=product), threads)
            cosines.append((dot / norm_product.clamp(min=1e-6)).clamp(-1, 1))
    del product, offsets, ws
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos), (n * cos) / safe)
    if fused:
        assert _mergekit_kernel is not None
        row = w0.shape[-1] if filter_wise else 0
        t, kept = t.contiguous(), (1 - t).contiguous()
        _mergekit_kernel.interpolate(average.numpy(), w0.numpy(), t.numpy(), kept.numpy(), row)
        return average.reshape(base.shape)
    return average.mul_(t).add_(w0.mul_(1 - t)).reshape(base.shape)


def karcher_in_dtype(
    tensors: Sequence[Tensor], alphas: Sequence[float], max_iter: int, tol: float
) -> Tensor:
    """mergekit's Karcher mean with the inputs in float16 / bfloat16: the norms in float32
    (0-dim tensors), the unit vectors, the mean, the tangent and every per-step scalar (dot,
    angle, θ / sin θ) in the inputs' dtype, each update rounded to that dtype."""
    f32 = torch.float32
    norms = [torch.linalg.vector_norm(t.to(f32)) for t in tensors]
    units = [
        torch.zeros_like(t) if n.item() == 0.0 else (t / n).to(t.dtype)
        for t, n in zip(tensors, norms, strict=True)
    ]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    valid_sum = sum(alphas[i] for i in valid)
    va = [alphas[i] / valid_sum for i in valid]
    vu = [units[i] for i in valid]
    mean = torch.zeros_like(vu[0])
    for a, u in zip(va, vu, strict=True):
        mean += a * u
    mean_norm = torch.linalg.vector_norm(mean.to(f32))
    mean = vu[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(va, vu, strict=True):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - dot * mean)
        g = torch.linalg.vector_norm(tangent.to(f32))
        if g.item() < tol:
            break
        mean = (torch.cos(g) * mean + torch.sin(g) * (tangent / g)).to(mean.dtype)
        n = torch.linalg.vector_norm(mean.to(f32))
        if n.item() > tol:
            mean = (mean / n).to(mean.dtype)
    scale = norms[0] * alphas[0]
    for a, n in zip(alphas[1:], norms[1:], strict=True):
        scale = scale + a * n
    return scale * mean
