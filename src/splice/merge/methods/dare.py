"""DARE: Drop And REscale (Yu et al. 2024, "Language Models are Super Mario").

    δ_i  = θ_i − base
    m_i  ~ Bernoulli(density_i) per entry      (drop probability p_i = 1 − density_i)
    δ̂_i = rescale(m_i ⊙ δ_i)
    dare_linear: merged = base + λ · Σ_i w_i δ̂_i   [/ Σ_i w_i when normalize]
    dare_ties:   TIES sign election + disjoint merge of w_i δ̂_i (see `ties`)

Rescale:
- "inverse" (splice default, the paper): δ̂ = m ⊙ δ / density, which keeps E[δ̂] = δ.
- "l1" (mergekit's ``rescale: true``, its default): δ̂ = m ⊙ δ · |δ|_1 / |m ⊙ δ|_1
  (unchanged when either norm < 1e-7). In the splice dialect both norms are float64 sums
  of per-row partials added in row order (`_row_gram.row_abs_sums`, `RowOrderSum`: rows
  along the first dimension) and the ratio is a float64 number multiplied into δ's dtype;
  the mergekit dialect sums |δ| in δ's dtype in torch's order and divides there, as
  mergekit.
- "none" (mergekit's ``rescale: false``): δ̂ = m ⊙ δ.
A boolean always has mergekit's meaning: true = "l1", false = "none".
density >= 1 leaves δ untouched; density 0 drops everything.

Randomness: the mask of model i comes from ``ctx.generator(i)`` (seeded from the merge
seed, the tensor name and i), drawn on the CPU, so a merge is reproducible and independent
of device, thread count and execution order. It cannot match mergekit's masks (mergekit
uses the global torch RNG). For contiguous float32 / bfloat16 CPU deltas the draw runs in
a small C extension (`_dare_kernel.c`) that repeats torch's Bernoulli draws from that
generator (its mt19937 words, two per entry) and zeroes the dropped entries in the same
pass: the same mask bits, about 8x less CPU time than ``bernoulli_`` + ``mul_``. It is checked
against torch's own draws at first use; torch's ops are used when it disagrees, is not
built, or δ has a NaN or an infinity.

Row chunks (`splice.engine.chunks`): torch draws the mask serially, entry j from words 2j
and 2j + 1 of the stream, so the mask of rows [a, b) of a tensor with c entries a row is
entries [a·c, b·c) of the whole tensor's mask: the stream from entry ``ctx.flat_offset`` =
a·c on. The kernel skips the 2·a·c words before it (whole 624-word blocks by the state's
twist alone, ~0.4 ns an entry); torch's path draws and discards those entries, a million
at a time (`dare_mask`). With the inverse rescale (1/density) or none, the drop and both
combines are then elementwise: DARE and DARE-TIES are merged in row chunks, bit for bit as
unchunked (`dare_chunks`, in both dialects: the mergekit dialect draws from the same
seeded generators). The L1 rescale needs the whole tensor's norms before and after the
drop: in the splice dialect they are row-order sums, which the engine finds by a pre-pass
over the chunks (`RowPartials`, answered from `dare_l1_partials` on each chunk: the drop
drawn at the chunk's offset), so ``rescale: l1`` is chunked too; in the mergekit dialect
(``rescale: true``, its default) they are torch's whole-tensor sums: not chunked.

Defaults: ``density`` is required in the splice dialect (mergekit defaults it to 1, which
makes DARE a no-op). dare_ties: normalize defaults to true in splice (TIES' disjoint mean,
as in the paper's DARE+TIES) and false in mergekit; ``disjoint``, when given, wins over
``normalize``.
"""

from collections.abc import Mapping
from functools import cache
from typing import Any

import torch
from torch import Tensor

from splice.merge.methods._common import UnitFloat, deltas_, linear_combine_, ties_combine_
from splice.merge.methods._compose import compose
from splice.merge.methods._row_gram import RowOrderSum, row_abs_sums
from splice.merge.registry import Dialect, MergeContext, PerModel
from splice.merge.sparsify import (
    L1_EPS,
    SKIP_BLOCK,
    Rescale,
    discard_draws,
    drop_,
    l1_sum,
    l1_threads,
    l1_work,
    rescale_kept_,
    rescale_mode,
)
from splice.merge.stats import RowPartials

try:
    from splice.merge.methods import _dare_kernel
except ImportError:  # built without a C compiler: torch's bernoulli_ and mul_
    _dare_kernel = None


def dare_mask(
    shape: torch.Size, density: float, generator: torch.Generator, offset: int = 0
) -> Tensor:
    """Bool keep-mask, each entry kept with probability ``density`` (drawn on the CPU):
    entries ``offset`` … ``offset + numel − 1`` of the mask drawn over ``offset + numel``
    entries (a row chunk's part of the whole tensor's mask). torch draws a bool mask
    serially, two words of the generator per entry whatever the density, so the first
    ``offset`` entries are drawn and discarded (`discard_draws`; checked:
    `split_draws_agree`)."""
    discard_draws(
        offset, lambda m: torch.empty(m, dtype=torch.bool).bernoulli_(density, generator=generator)
    )
    return torch.empty(shape, dtype=torch.bool).bernoulli_(density, generator=generator)


def dare_apply_(
    delta: Tensor,
    mask: Tensor,
    density: float,
    rescale: Rescale,
    threads: int = 1,
    *,
    l1: Tensor | None = None,
    work: Tensor | None = None,
) -> Tensor:
    """Zero the dropped entries of ``delta`` (in place) and rescale the kept ones
    (``threads``, ``work``: the order of the L1 rescale's sums and their |δ| buffer,
    `splice.merge.sparsify.l1_sum`; ``l1``: |δ|_1 when already summed)."""
    return drop_(delta, mask, rescale, density, l1=l1, threads=threads, work=work)


def seeded_generator(seed: int) -> torch.Generator:
    """A fresh CPU generator seeded with ``seed``."""
    return torch.Generator(device="cpu").manual_seed(seed)


def dare_drop_(
    delta: Tensor,
    density: float,
    seed: int,
    rescale: Rescale,
    offset: int = 0,
    threads: int = 1,
    work: Tensor | None = None,
) -> Tensor:
    """``dare_apply_(δ, dare_mask(δ.shape, density, seeded_generator(seed), offset),
    density, rescale)``: in one compiled pass when `compiled_drop_applies`, else with
    torch's ops. ``offset``: δ's first entry's place in the flat tensor whose mask is drawn
    (a row chunk's first flat entry; not with the L1 rescale, whose norms span the whole
    tensor); ``threads``, ``work``: the order of its sums and their |δ| buffer,
    `splice.merge.sparsify.l1_sum`."""
    mode = rescale_mode(rescale)
    if offset and mode == "l1":
        raise ValueError("dare_drop_: the L1 rescale needs the whole tensor (offset 0)")
    l1 = None
    if compiled_drop_applies(delta):
        assert _dare_kernel is not None
        l1 = l1_sum(delta, threads, work) if mode == "l1" else None
        buf = delta.view(torch.int16) if delta.dtype == torch.bfloat16 else delta
        if _dare_kernel.drop(buf.numpy(), delta.element_size(), seed, float(density), offset):
            return rescale_kept_(delta, mode, density, l1, threads, work)
    # torch's ops: the kernel is not used, or declined δ (a non-finite entry) untouched, so
    # an |δ|_1 it summed still holds
    mask = dare_mask(delta.shape, density, seeded_generator(seed), offset)
    return dare_apply_(delta, mask, density, rescale, threads, l1=l1, work=work)


def compiled_drop_applies(delta: Tensor) -> bool:
    """Whether `dare_drop_` can use the compiled draw: built, agreeing with torch's draws
    (`compiled_drop_agrees`), and δ a contiguous float32 / bfloat16 CPU tensor without
    autograd."""
    return (
        _dare_kernel is not None
        and delta.dtype in (torch.float32, torch.bfloat16)
        and delta.device.type == "cpu"
        and delta.is_contiguous()
        and not delta.requires_grad
        and compiled_drop_agrees()
    )


# (entries, offset, density) of the self-checks: sizes and offsets around the 312-entry
# block, offsets inside a block and past several, and a size and offset of several blocks
_CHECKS = ((1, 0, 0.5), (311, 0, 0.3), (625, 0, 0.9), (4099, 0, 0.2), (20000, 0, 0.5))
_OFFSET_CHECKS = ((1, 311, 0.5), (313, 1, 0.3), (625, 312, 0.9), (700, 937, 0.2), (3001, 4567, 0.5))


@cache
def compiled_drop_agrees() -> bool:
    """The compiled draw against torch's ``bernoulli_`` + ``mul_`` on a few sizes, offsets,
    seeds and densities (with an offset: the slice of torch's mask over offset + n
    entries), once per process (a torch that draws differently disables it)."""
    if _dare_kernel is None:
        return False
    g = seeded_generator(20240601)
    for n, offset, density in _CHECKS + _OFFSET_CHECKS:
        seed = int(torch.randint(0, 2**62, (1,), generator=g))
        whole = torch.empty(offset + n, dtype=torch.bool)
        whole.bernoulli_(density, generator=seeded_generator(seed))
        for dtype in (torch.float32, torch.bfloat16):
            delta = torch.randn(n, generator=g).to(dtype)
            want = delta * whole[offset:]
            got = delta.clone()
            buf = got.view(torch.int16) if dtype == torch.bfloat16 else got
            if not _dare_kernel.drop(buf.numpy(), got.element_size(), seed, density, offset):
                return False
            if not torch.equal(got.view(torch.uint8), want.view(torch.uint8)):
                return False
    return True


@cache
def split_draws_agree() -> bool:
    """Whether torch's mask of a slice drawn after discarding the entries before it
    (`dare_mask` with an offset, in blocks) is that slice of the mask drawn at once: torch
    takes the same words per entry whatever the size of a draw. Checked once per process
    on offsets inside and across the 312-entry block and across ``SKIP_BLOCK``; a torch
    that draws otherwise (e.g. a vectorized or MKL Bernoulli) keeps DARE unchunked."""
    g = seeded_generator(20240602)
    for n, offset, density in (*_OFFSET_CHECKS, (5, SKIP_BLOCK + 7, 0.3)):
        seed = int(torch.randint(0, 2**62, (1,), generator=g))
        whole = torch.empty(offset + n, dtype=torch.bool)
        whole.bernoulli_(density, generator=seeded_generator(seed))
        part = dare_mask(torch.Size([n]), density, seeded_generator(seed), offset)
        if not torch.equal(part, whole[offset:]):
            return False
    return True


def dare_chunks(params: Mapping[str, Any], dialect: Dialect, ndim: int) -> bool:
    """``row_chunks`` of DARE: a row chunk's mask is the stream of the tensor's generator
    from the chunk's first flat entry (``ctx.flat_offset``), then the inverse rescale or
    none and the combine are elementwise, and the splice dialect's L1 rescale too given
    the whole tensor's norms (`DARE_L1`); not the mergekit dialect's L1 rescale (torch's
    sums over the whole tensor), nor where torch's draws do not split
    (`split_draws_agree`)."""
    l1 = rescale_mode(params["rescale"]) == "l1"
    return (not l1 or dialect == "splice") and split_draws_agree()


DARE_L1 = RowPartials("dare_l1")  # per model i: columns 2i, 2i + 1 = |δ_i|_1, |m_i ⊙ δ_i|_1


def dare_l1_requests(params: Mapping[str, Any]) -> list[RowPartials]:
    """The L1 rescale's norms, over the whole tensor (answered for row chunks)."""
    return [DARE_L1] if rescale_mode(params["rescale"]) == "l1" else []


def _drop_l1_rows(d: Tensor, density: float, seed: int, offset: int) -> tuple[Tensor, Tensor]:
    """Drop δ's entries (in place, no rescale); its per-row L1 partials before and after
    (float64 [rows])."""
    before = row_abs_sums(d)
    dare_drop_(d, density, seed, "none", offset)
    return before, row_abs_sums(d)


def dare_l1_partials(
    base: Tensor | None, tensors: list[Tensor], ctx: MergeContext, params: Mapping[str, Any]
) -> Tensor:
    """``row_partials`` of DARE's L1 rescale (splice dialect): per row, [|δ_0|, |m_0 ⊙ δ_0|,
    |δ_1|, …] (float64 [rows, 2n]; zeros for a model not dropped), the drop drawn from the
    rows' first flat entry (``ctx.flat_offset``); ``tensors`` become the dropped δ."""
    assert base is not None
    deltas = deltas_(base, tensors)
    rows = base.shape[0] if base.dim() else 1
    out = torch.zeros((rows, 2 * len(deltas)), dtype=torch.float64)
    for i, (d, dens) in enumerate(zip(deltas, params["density"], strict=True)):
        if dens < 1:
            before, after = _drop_l1_rows(d, dens, ctx.generator_seed(i), ctx.flat_offset)
            out[:, 2 * i], out[:, 2 * i + 1] = before, after
    return out


def _dare_l1_(deltas: list[Tensor], density: list[float], ctx: MergeContext) -> None:
    """The splice dialect's L1-rescaled drop: δ_i ← m_i ⊙ δ_i · |δ_i|_1 / |m_i ⊙ δ_i|_1,
    the norms row-order float64 sums over the whole tensor (a row chunk's: the engine's
    answer to `DARE_L1`), the ratio a float64 number (unchanged when either norm is
    below 1e-7)."""
    totals = ctx.model_stats.get(DARE_L1)
    for i, (d, dens) in enumerate(zip(deltas, density, strict=True)):
        if dens >= 1:
            continue
        seed = ctx.generator_seed(i)
        if totals is not None:
            dare_drop_(d, dens, seed, "none", ctx.flat_offset)
            before, after = float(totals[2 * i]), float(totals[2 * i + 1])
        else:
            rows = _drop_l1_rows(d, dens, seed, ctx.flat_offset)
            before, after = (_ordered_total(r) for r in rows)
        if before >= L1_EPS and after >= L1_EPS:
            d.mul_(before / after)


def _ordered_total(partials: Tensor) -> float:
    total = RowOrderSum(())
    total.add(partials)
    return float(total.result())


def dare_(
    deltas: list[Tensor],
    *,
    density: PerModel[UnitFloat],
    rescale: Rescale = "inverse",
    ctx: MergeContext,
) -> None:
    """Drop each entry of δ_i with probability 1 − density_i, rescale the rest (in place)."""
    if rescale_mode(rescale) == "l1" and ctx.dialect == "splice":
        return _dare_l1_(deltas, density, ctx)
    threads = l1_threads(ctx.dialect)
    # one |δ| buffer for every model's two L1 sums
    work = l1_work(deltas) if rescale_mode(rescale) == "l1" else None
    for i, (d, dens) in enumerate(zip(deltas, density, strict=True)):
        if dens < 1:
            dare_drop_(d, dens, ctx.generator_seed(i), rescale, ctx.flat_offset, threads, work)


_MERGEKIT = {"density": 1.0, "rescale": True}
compose(
    "dare_linear",
    dare_,
    linear_combine_,
    summary="Randomly drop task-vector entries, rescale, then task arithmetic.",
    random=True,
    mergekit_defaults=_MERGEKIT,
    mergekit_ignored={"int8_mask"},
    row_chunks=dare_chunks,
    model_stats=dare_l1_requests,
    row_partials=dare_l1_partials,
)
compose(
    "dare_ties",
    dare_,
    ties_combine_,
    summary="Randomly drop task-vector entries, rescale, then TIES sign election and merge.",
    random=True,
    mergekit_defaults={**_MERGEKIT, "normalize": False},
    mergekit_ignored={"int8_mask"},
    row_chunks=dare_chunks,
    model_stats=dare_l1_requests,
    row_partials=dare_l1_partials,
)
