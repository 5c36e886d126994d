"""Top-k selection by magnitude: which entries of a tensor (or of each row) are the k
largest. The kernel under `splice.delta.sparsify` and the merge methods' sparsifiers.

Counting rules (`keep_count`):
- splice dialect: keep exactly ``round(density * n)`` entries (Python ``round``: halves go
  to the even integer), clamped to ``[0, n]``.
- mergekit dialect: ``density >= 1`` keeps all, ``density <= 0`` keeps none, otherwise
  ``max(1, int(density * n))`` (mergekit's ``sparsify.magnitude``).

Masks are exact-count: magnitudes are compared in float32; every entry strictly above the
threshold is kept and ties at the threshold are filled in flat row-major order (first ones
first) until the count is exact. Thresholds come from a selection, not a full sort: radix
selection over the float32 bits for a whole tensor (`kth_largest`), ``torch.kthvalue`` per
row. The one exception is `TieOrder` "torch_sort" (mergekit dialect), which sorts a tensor
only when equal magnitudes straddle a keep boundary.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from splice.delta.argsort_select import argsort_topk_mask, selection_path, trim_like_argsort_
from splice.io import scratch

try:
    from splice.delta import _radix_kernel
except ImportError:  # built without a C compiler: torch's ops
    _radix_kernel = None

# How ties at a keep boundary are broken:
# - "flat": the first equal entries in flat row-major order (splice's rule, deterministic
#   across devices and torch versions);
# - "torch_sort": the order of torch's own unstable sort, as mergekit gets it (only needed
#   for exact parity when equal magnitudes straddle the boundary, e.g. bf16 task vectors;
#   the tensor is then sorted, otherwise the fast exact path is used).
TieOrder = Literal["flat", "torch_sort"]


def keep_count(n: int, density: float, dialect: str = "splice") -> int:
    """How many of ``n`` entries a magnitude trim to ``density`` keeps."""
    if n <= 0:
        return 0
    if dialect == "mergekit":
        if density >= 1:
            return n
        if density <= 0:
            return 0
        return min(n, max(1, int(density * n)))
    return max(0, min(n, round(density * n)))


def largest_mask(x: Tensor, density: float) -> Tensor:
    """Bool mask of the `keep_count` (splice rule) entries of largest |x|, ties in flat order."""
    return topk_mask(x.abs(), keep_count(x.numel(), density))


def magnitude(x: Tensor) -> Tensor:
    """|x| in float32 (a new tensor; ``x`` is left alone)."""
    if x.requires_grad:
        return x.abs() if x.dtype == torch.float32 else x.detach().abs().float()
    # into a scratch tensor (`splice.io.scratch`: reused pages in a merge), the same bits;
    # another dtype is converted first, then |.| in place (both exact: the same bits as
    # x.abs().float(), with one float32 tensor instead of an |x| of x's dtype beside it)
    out = scratch.empty(x.shape, torch.float32, x.device)
    if x.dtype != torch.float32:
        return out.copy_(x).abs_()
    return torch.abs(x, out=out)


def mask_(delta: Tensor, mask: Tensor) -> Tensor:
    """In place: δ · mask for a bool ``mask`` of δ's shape, the mask converted to δ's dtype
    in a scratch tensor first (`splice.io.scratch`: reused pages in a merge). The same
    products as ``delta.mul_(mask)``, which converts the bool operand into a fresh tensor of
    δ's size itself (the zeros keep δ's sign)."""
    if mask.dtype == torch.bool and mask.shape == delta.shape and delta.device == mask.device:
        mask = scratch.empty(mask.shape, delta.dtype, delta.device).copy_(mask)
    return delta.mul_(mask)


def high_bits(bits: Tensor) -> Tensor:
    """``bits >> 16`` (the radix selections' high half) into a scratch tensor
    (`splice.io.scratch`: reused pages in a merge)."""
    return torch.bitwise_right_shift(
        bits, 16, out=scratch.empty(bits.shape, bits.dtype, bits.device)
    )


def topk_mask(mag: Tensor, k: int, ties: TieOrder = "flat") -> Tensor:
    """Bool mask (shape of ``mag``) keeping exactly the ``k`` largest entries of ``mag``.

    ``mag`` holds magnitudes (non-negative). Ties at the threshold: see `TieOrder`.
    """
    flat = mag.reshape(-1)
    if flat.dtype != torch.float32:
        flat = flat.float()
    if ties == "torch_sort" and flat.device.type == "cpu" and selection_path() == "compiled":
        # One compiled pass selects torch's order whether or not there are ties.
        return argsort_topk_mask(flat, k).reshape(mag.shape)
    mask, tied = _topk_flat(flat, k)
    if tied and ties == "torch_sort":
        mask = argsort_topk_mask(flat, k)
    return mask.reshape(mag.shape)


def trim_torch_sort_(delta: Tensor, k: int) -> Tensor:
    """In place: zero every entry of ``delta`` but the ``k`` that
    ``torch.argsort(|δ|, descending=True)[:k]`` selects (mergekit's per-tensor trim; the
    zeros keep δ's sign, as ``δ · mask`` gives): one compiled pass where it applies
    (`trim_like_argsort_`), else the mask of `topk_mask` with ties in torch's order."""
    if not trim_like_argsort_(delta, k):
        mask_(delta, topk_mask(magnitude(delta), k, "torch_sort"))
    return delta


def _topk_flat(flat: Tensor, k: int) -> tuple[Tensor, bool]:
    """Exact top-k of a 1-D float32 tensor, ties in flat order; and whether ties at the
    threshold had to be broken (more equal entries than places left)."""
    n = flat.numel()
    if k <= 0 or n == 0:
        return torch.zeros(n, dtype=torch.bool, device=flat.device), False
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=flat.device), False
    value, above, equal = kth_largest(flat, k)
    if above + equal == k:
        return flat >= value, False
    mask = flat > value
    mask[(flat == value).nonzero().squeeze(1)[: k - above]] = True
    return mask, True


_BINS = 1 << 16


def _select_bin(hist: Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest entry (1-based) and the count in higher bins."""
    above = hist.flip(0).cumsum(0).flip(0) - hist
    b = int(((above < k) & (above + hist >= k)).nonzero()[0])
    return b, int(above[b])


def radix_histogram(flat: Tensor, bucket: int | None) -> tuple[Tensor, bool]:
    """The radix selection's counts (65,536 int64) of a 1-D non-negative float32 tensor: by
    the high 16 bits of every value (``bucket`` None), else by the low 16 bits of the values
    whose high 16 bits are ``bucket``; and whether a value is NaN (counted by its bits,
    above +inf). One compiled pass (``radix_histogram`` of ``_radix_kernel``) for a CPU
    tensor; else, or to count a NaN, torch's isnan, shift, mask and ``bincount``."""
    compiled = getattr(_radix_kernel, "radix_histogram", None)
    if compiled is not None and flat.device.type == "cpu" and not flat.requires_grad:
        hist = torch.zeros(_BINS, dtype=torch.int64)
        if compiled(flat.contiguous().numpy(), hist.numpy(), -1 if bucket is None else bucket):
            return hist, False
    nan = bool(torch.isnan(flat).any())
    bits = flat.view(torch.int32)
    if bucket is None:
        return torch.bincount(high_bits(bits), minlength=_BINS), nan
    return torch.bincount(bits[high_bits(bits) == bucket] & 0xFFFF, minlength=_BINS), nan


def kth_largest(flat: Tensor, k: int) -> tuple[float, int, int]:
    """The k-th largest of a 1-D non-negative float32 tensor (1 <= k <= n), with how many
    entries are strictly larger and how many equal it.

    Radix selection on the float32 bit patterns (monotonic for non-negative floats): a
    65,536-bin histogram of the high 16 bits finds the bucket, a second one of the low 16
    bits inside that bucket finds the value. Two histogram passes (`radix_histogram`):
    O(n), and several times faster on the CPU than ``torch.kthvalue`` on large tensors.
    """
    bucket, above = _select_bin(radix_histogram(flat, None)[0], k)
    low_hist = radix_histogram(flat, bucket)[0]
    lo, above_lo = _select_bin(low_hist, k - above)
    pattern = torch.tensor([(bucket << 16) | lo], dtype=torch.int32)
    return float(pattern.view(torch.float32)), above + above_lo, int(low_hist[lo])


def topk_mask_rows(mag: Tensor, k: int) -> Tensor:
    """Row-wise `topk_mask` for a 2-D ``mag``: exactly ``k`` entries kept in every row.

    The per-row threshold comes from ``torch.kthvalue`` (a selection, parallel over rows).
    """
    n = mag.shape[1]
    if mag.shape[0] == 1:
        return topk_mask(mag, k)
    if k <= 0 or n == 0:
        return torch.zeros(mag.shape, dtype=torch.bool, device=mag.device)
    if k >= n:
        return torch.ones(mag.shape, dtype=torch.bool, device=mag.device)
    # The k-th largest is the (n - k + 1)-th smallest.
    threshold = torch.kthvalue(mag, n - k + 1, dim=1, keepdim=True).values
    mask = mag >= threshold
    counts = mask.sum(dim=1, keepdim=True)
    excess = counts > k
    if not bool(excess.any()):
        return mask
    # Some rows have more ties at the threshold than places left: keep the first ones.
    bad = excess.squeeze(1).nonzero().squeeze(1)
    sub_mag, sub_thr = mag[bad], threshold[bad]
    above = sub_mag > sub_thr
    ties = sub_mag == sub_thr
    places = k - above.sum(dim=1, keepdim=True)
    order = ties.cumsum(dim=1)
    mask[bad] = above | (ties & (order <= places))
    return mask


def band_mask_rows(mag: Tensor, skip_top: int, keep: int, ties: TieOrder = "flat") -> Tensor:
    """Row-wise band of ranks: drop the ``skip_top`` largest entries of each row, keep the
    next ``keep`` largest, drop the rest (exact counts). ``ties="torch_sort"`` applies to a
    single row only (mergekit's breadcrumbs works on the flattened tensor)."""
    if mag.shape[0] == 1:
        flat = mag.reshape(-1).float()
        upper, tied = _topk_flat(flat, skip_top + keep)
        if skip_top > 0:
            top, tied_top = _topk_flat(flat, skip_top)
            upper &= ~top
            tied = tied or tied_top
        if tied and ties == "torch_sort":
            # positions [bottom, bottom + keep) of torch's unstable ascending sort (mergekit)
            bottom = flat.numel() - skip_top - keep
            upper = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
            upper[torch.sort(flat, descending=False).indices[bottom : bottom + keep]] = True
        return upper.reshape(mag.shape)
    upper = topk_mask_rows(mag, skip_top + keep)
    if skip_top > 0:
        upper &= ~topk_mask_rows(mag, skip_top)
    return upper
