"""DARE: Drop And REscale (Yu et al. 2024, "Language Models are Super Mario").

    δ_i  = θ_i − base
    m_i  ~ Bernoulli(density_i) per entry      (drop probability p_i = 1 − density_i)
    δ̂_i = rescale(m_i ⊙ δ_i)
    dare_linear: merged = base + λ · Σ_i w_i δ̂_i   [/ Σ_i w_i when normalize]
    dare_ties:   TIES sign election + disjoint merge of w_i δ̂_i (see `ties`)

Rescale:
- "inverse" (splice default, the paper): δ̂ = m ⊙ δ / density, which keeps E[δ̂] = δ.
- "l1" (mergekit's ``rescale: true``, its default): δ̂ = m ⊙ δ · |δ|_1 / |m ⊙ δ|_1
  (unchanged when either norm < 1e-7).
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

Defaults: ``density`` is required in the splice dialect (mergekit defaults it to 1, which
makes DARE a no-op). dare_ties: normalize defaults to true in splice (TIES' disjoint mean,
as in the paper's DARE+TIES) and false in mergekit; ``disjoint``, when given, wins over
``normalize``.
"""

from functools import cache

import torch
from torch import Tensor

from splice.merge.methods._common import UnitFloat, linear_combine_, ties_combine_
from splice.merge.methods._compose import compose
from splice.merge.registry import MergeContext, PerModel
from splice.merge.sparsify import Rescale, drop_, rescale_kept_, rescale_mode

try:
    from splice.merge.methods import _dare_kernel
except ImportError:  # built without a C compiler: torch's bernoulli_ and mul_
    _dare_kernel = None


def dare_mask(shape: torch.Size, density: float, generator: torch.Generator) -> Tensor:
    """Bool keep-mask, each entry kept with probability ``density`` (drawn on the CPU)."""
    return torch.empty(shape, dtype=torch.bool).bernoulli_(density, generator=generator)


def dare_apply_(delta: Tensor, mask: Tensor, density: float, rescale: Rescale) -> Tensor:
    """Zero the dropped entries of ``delta`` (in place) and rescale the kept ones."""
    return drop_(delta, mask, rescale, density)


def seeded_generator(seed: int) -> torch.Generator:
    """A fresh CPU generator seeded with ``seed``."""
    return torch.Generator(device="cpu").manual_seed(seed)


def dare_drop_(delta: Tensor, density: float, seed: int, rescale: Rescale) -> Tensor:
    """``dare_apply_(δ, dare_mask(δ.shape, density, seeded_generator(seed)), density,
    rescale)``: in one compiled pass when `compiled_drop_applies`, else with torch's ops."""
    if compiled_drop_applies(delta):
        assert _dare_kernel is not None
        mode = rescale_mode(rescale)
        l1 = delta.abs().sum() if mode == "l1" else None
        buf = delta.view(torch.int16) if delta.dtype == torch.bfloat16 else delta
        if _dare_kernel.drop(buf.numpy(), delta.element_size(), seed, float(density)):
            return rescale_kept_(delta, mode, density, l1)
    mask = dare_mask(delta.shape, density, seeded_generator(seed))
    return dare_apply_(delta, mask, density, rescale)


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


@cache
def compiled_drop_agrees() -> bool:
    """The compiled draw against torch's ``bernoulli_`` + ``mul_`` on a few sizes, seeds and
    densities, once per process (a torch that draws differently disables it)."""
    if _dare_kernel is None:
        return False
    g = seeded_generator(20240601)
    for n, density in ((1, 0.5), (311, 0.3), (625, 0.9), (4099, 0.2), (20000, 0.5)):
        seed = int(torch.randint(0, 2**62, (1,), generator=g))
        for dtype in (torch.float32, torch.bfloat16):
            delta = torch.randn(n, generator=g).to(dtype)
            want = delta * dare_mask(delta.shape, density, seeded_generator(seed))
            got = delta.clone()
            buf = got.view(torch.int16) if dtype == torch.bfloat16 else got
            if not _dare_kernel.drop(buf.numpy(), got.element_size(), seed, density):
                return False
            if not torch.equal(got.view(torch.uint8), want.view(torch.uint8)):
                return False
    return True


def dare_(
    deltas: list[Tensor],
    *,
    density: PerModel[UnitFloat],
    rescale: Rescale = "inverse",
    ctx: MergeContext,
) -> None:
    """Drop each entry of δ_i with probability 1 − density_i, rescale the rest (in place)."""
    for i, (d, dens) in enumerate(zip(deltas, density, strict=True)):
        if dens < 1:
            dare_drop_(d, dens, ctx.generator_seed(i), rescale)


_MERGEKIT = {"density": 1.0, "rescale": True}
compose(
    "dare_linear",
    dare_,
    linear_combine_,
    summary="Randomly drop task-vector entries, rescale, then task arithmetic.",
    random=True,
    mergekit_defaults=_MERGEKIT,
    mergekit_ignored={"int8_mask"},
)
compose(
    "dare_ties",
    dare_,
    ties_combine_,
    summary="Randomly drop task-vector entries, rescale, then TIES sign election and merge.",
    random=True,
    mergekit_defaults={**_MERGEKIT, "normalize": False},
    mergekit_ignored={"int8_mask"},
)
