"""Drop-and-rescale of task vectors: the per-tensor steps the TIES-family sparsifiers share
(pure functions, in place). Which entries to keep is decided by `splice.delta.topk` (top-k
by magnitude) or by a random mask; this module zeroes the others and rescales.

Rescale rules (`drop_`):
- "inverse": each kept entry divided by its keep probability, so E[δ̂] = δ (DARE, DELLA);
- "l1" (mergekit's ``rescale: true``): the kept entries scaled to the L1 norm of δ
  measured before masking (`rescale_l1`; unchanged when either norm is below 1e-7). The
  norms are ``x.abs().sum()`` in x's dtype, added up in the order torch uses with
  ``threads`` intra-op threads (`l1_sum`): the mergekit dialect passes mergekit's thread
  count (`l1_threads`), since torch splits a sum of 2^15 entries or more over its threads
  and mergekit's ratio depends on it; the splice dialect sums serially, whatever the
  machine or ``--threads``;
- "none" (mergekit's ``rescale: false``): the kept entries as they are.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from splice.io import scratch
from splice.merge.reductions import mergekit_threads, sum_last
from splice.merge.stats import KeepRule

try:
    from splice.delta import _radix_kernel
except ImportError:  # built without a C compiler: torch's ops (`keep_rule_mask`)
    _radix_kernel = None

L1_EPS = 1e-7  # mergekit's tolerance: no L1 rescale when either norm is below it

SKIP_BLOCK = 1 << 20  # entries drawn and discarded at a time when a mask starts at an offset

# A boolean always has mergekit's meaning: true = "l1", false = "none".
Rescale = Literal["inverse", "l1", "none"] | bool


def discard_draws(offset: int, draw: Callable[[int], object]) -> None:
    """Move a generator past the first ``offset`` entries of a random mask: ``draw(m)``
    draws m entries with the kernel of the real draw (so it takes the same generator words),
    called ``SKIP_BLOCK`` entries at a time. A row chunk's mask drawn next is then the
    tensor's stream from the chunk's first entry (DARE, DELLA)."""
    for done in range(0, offset, SKIP_BLOCK):
        draw(min(SKIP_BLOCK, offset - done))


def keep_rule_mask(mag: Tensor, rule: KeepRule) -> Tensor:
    """Bool mask for a whole-model `KeepRule`: entries with mag > threshold, plus the first
    ``tie_quota`` entries (flat row-major order) with mag == threshold."""
    threshold = torch.tensor(rule.threshold, dtype=torch.float32, device=mag.device)
    mask = mag > threshold
    if rule.tie_quota > 0:
        flat = mask.reshape(-1)
        ties = (mag.reshape(-1) == threshold).nonzero().squeeze(1)[: rule.tie_quota]
        flat[ties] = True
    return mask


def l1_threads(dialect: str) -> int:
    """The thread count whose order `l1_sum` follows: mergekit's in the mergekit dialect,
    else 1 (serial)."""
    return mergekit_threads() if dialect == "mergekit" else 1


def l1_sum(x: Tensor, threads: int, work: Tensor | None = None) -> Tensor:
    """|x|_1 as ``x.abs().sum()`` (a 0-dim tensor of x's dtype) computes it with ``threads``
    intra-op threads (`sum_last`); |x| in ``work`` (a 1-D tensor of x's dtype and device and
    at least x's size, from `l1_work`: a caller summing several tensors reuses one) or else a
    scratch tensor (`splice.io.scratch`)."""
    if x.requires_grad:
        return sum_last(x.abs().reshape(-1), threads)
    if work is None:
        out = scratch.empty(x.shape, x.dtype, x.device)
    else:
        out = work[: x.numel()].view(x.shape)
    return sum_last(torch.abs(x, out=out).reshape(-1), threads)


def l1_work(like: Sequence[Tensor]) -> Tensor | None:
    """One |x| buffer for `l1_sum` over all of ``like`` (same dtype and device), from the
    scratch pool; None for none or tensors needing autograd. A tensor too large for the
    pool's share would otherwise be a fresh allocation, its pages faulted in and zeroed,
    at each sum: DARE's L1 rescale sums each model's δ twice, six fresh 131 MB buffers per
    embedding-sized tensor of a 0.37B Llama × 3 merge."""
    if not like or any(t.requires_grad for t in like):
        return None
    first = like[0]
    return scratch.empty((max(t.numel() for t in like),), first.dtype, first.device)


def keep_rule_trim_(delta: Tensor, rule: KeepRule) -> bool:
    """In place: δ · `keep_rule_mask`(|δ|, rule), the zeros with δ's sign, in one compiled
    pass (``apply_keep_rule`` of ``_radix_kernel``) for a contiguous float32 / bfloat16 CPU
    δ with finite entries and a rule threshold >= 0; False (δ untouched) otherwise, for the
    torch path."""
    apply = getattr(_radix_kernel, "apply_keep_rule", None)
    if (
        apply is None
        or delta.device.type != "cpu"
        or delta.dtype not in (torch.float32, torch.bfloat16)
        or not delta.is_contiguous()
        or delta.requires_grad
        or not rule.threshold >= 0
    ):
        return False
    (bits,) = struct.unpack("<I", struct.pack("<f", rule.threshold))
    view = delta.view(torch.int32 if delta.dtype == torch.float32 else torch.int16)
    return bool(apply(view.numpy(), delta.element_size(), bits, rule.tie_quota))


def rescale_l1(
    original_l1: Tensor | float, masked: Tensor, threads: int = 1, work: Tensor | None = None
) -> Tensor:
    """mergekit's L1 matching, in place: ``masked *= |orig|_1 / |masked|_1``.

    ``original_l1`` is |orig|_1 measured before masking; |masked|_1 is summed in the order
    of ``threads`` threads (`l1_sum`, in ``work`` when given). Nothing changes when either
    norm is below 1e-7.
    """
    before = torch.as_tensor(original_l1, dtype=masked.dtype, device=masked.device)
    after = l1_sum(masked, threads, work)
    if before < L1_EPS or after < L1_EPS:
        return masked
    return masked.mul_(before / after)


def rescale_inverse(masked: Tensor, density: float) -> Tensor:
    """DARE's rescale, in place: divide the kept entries by the keep probability."""
    if 0 < density < 1:
        masked.div_(density)
    return masked


def drop_(
    delta: Tensor,
    keep: Tensor,
    rescale: Rescale,
    keep_prob: Tensor | float = 1.0,
    l1: Tensor | None = None,
    threads: int = 1,
    work: Tensor | None = None,
) -> Tensor:
    """δ ← rescale(keep ⊙ δ), in place (see the module docstring for ``rescale``).

    ``keep_prob``: the keep probability of every entry (a number) or of each entry (a tensor
    of δ's shape), used by "inverse". ``l1``: |δ|_1 when the caller has measured it (else
    it is measured here, in δ's dtype). ``threads``, ``work``: the L1 sums' order and |δ|
    buffer (`l1_sum`).
    """
    mode = rescale_mode(rescale)
    if mode == "l1" and l1 is None:
        l1 = l1_sum(delta, threads, work)
    delta.mul_(keep.to(delta.device))
    return rescale_kept_(delta, mode, keep_prob, l1, threads, work)


def rescale_mode(rescale: Rescale) -> Literal["inverse", "l1", "none"]:
    """The rescale rule's name (a boolean has mergekit's meaning: true "l1", false "none")."""
    return "l1" if rescale is True else "none" if rescale is False else rescale


def rescale_kept_(
    delta: Tensor,
    rescale: Rescale,
    keep_prob: Tensor | float = 1.0,
    l1: Tensor | None = None,
    threads: int = 1,
    work: Tensor | None = None,
) -> Tensor:
    """The rescale half of `drop_`, in place, on a δ whose dropped entries are already zero
    (``l1``: |δ|_1 before the drop, required for "l1"; ``threads``, ``work``: `l1_sum`'s
    order and buffer)."""
    mode = rescale_mode(rescale)
    if mode == "inverse":
        if isinstance(keep_prob, Tensor):
            return delta.div_(keep_prob.to(delta.device, delta.dtype))
        return rescale_inverse(delta, keep_prob)
    if mode == "l1":
        assert l1 is not None
        rescale_l1(l1, delta, threads, work)
    return delta


def rows_view(x: Tensor) -> Tensor:
    """``x`` as 2-D rows along its last axis: ``[..., C] -> [-1, C]``; a 1-D or 0-D tensor
    is a single row."""
    if x.dim() <= 1:
        return x.reshape(1, -1)
    return x.reshape(-1, x.shape[-1])
