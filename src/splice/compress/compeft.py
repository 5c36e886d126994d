"""ComPEFT (Yadav et al. 2023, "ComPEFT: Compression for Communicating Parameter Efficient
Updates via Sparsification and Quantization"): sparse ternary compression of an update.

    m   = top-k mask of |Δ|          keep the k = round(density · n) largest magnitudes
    γ   = sign(Δ) ⊙ m                 ternary: −1, 0, +1
    Δ̂  = α · σ(Δ) · γ               one scale per tensor

σ(Δ) is the standard deviation of the *original* update (the paper's α · σ(τ); torch's
default Bessel-corrected std, as the official code's `tensor.std()`); `std_of="sparse"`
takes it of the sparsified update instead, as the official `replace_noise_and_constant`
does (it zeroes the dropped entries before calling `.std()`). α: the paper tunes it on
validation data; the default here is 1. Ties at the top-k threshold: first in flat order
(`splice.merge.sparsify.topk_mask`).

Size, in bits: `dense` = n · (bits of the original dtype); `ternary_2bit` = 2n + 32 (two
bits per entry plus a float32 scale); `entropy` = n · H(k/n) + k + 32 (the positions at
their binary entropy, the bound the paper's Golomb coding approaches, one sign bit per kept
entry, the scale). Reconstruction error: ‖Δ − Δ̂‖_F / ‖Δ‖_F.

For a LoRA adapter (`compeft_adapter`), the update compressed is each saved factor itself
(lora_A and lora_B tensors, i.e. relative to a zero initialization: an adapter folder does
not carry A's random init, the paper compresses trained − initial PEFT weights). The output
is a PEFT adapter folder holding the decompressed factors, so PEFT can load it; a packed
on-disk format is not written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from splice.errors import MergeValidationError
from splice.merge.sparsify import keep_count, magnitude, topk_mask

StdOf = Literal["original", "sparse"]


@dataclass(frozen=True)
class CompeftTensor:
    """Signs in {−1, 0, +1} (int8) and one scale: Δ̂ = scale · signs."""

    signs: torch.Tensor
    scale: float
    source_bits: int  # bits per entry of the original dtype

    def decompress(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.signs.to(dtype) * self.scale

    @property
    def numel(self) -> int:
        return self.signs.numel()

    @property
    def nnz(self) -> int:
        return int(self.signs.count_nonzero())

    def bits(self) -> dict[str, float]:
        """Sizes in bits: dense original, 2-bit ternary, entropy-coded positions."""
        n, k = self.numel, self.nnz
        p = k / n if n else 0.0
        h = 0.0 if p in (0.0, 1.0) else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))
        return {
            "dense": float(n * self.source_bits),
            "ternary_2bit": float(2 * n + 32),
            "entropy": n * h + k + 32,
        }


def compeft_compress(
    delta: torch.Tensor, density: float, alpha: float = 1.0, std_of: StdOf = "original"
) -> CompeftTensor:
    """Keep the top `density` fraction of |Δ|, ternarize to sign × α · σ."""
    if not 0 <= density <= 1:
        raise MergeValidationError(f"density = {density} must be in [0, 1]")
    if not math.isfinite(alpha) or alpha <= 0:
        raise MergeValidationError(f"alpha = {alpha} must be a positive number")
    x = delta.detach().float()
    mask = topk_mask(magnitude(x), keep_count(x.numel(), density))
    signs = (torch.sign(x) * mask).to(torch.int8)
    src = x if std_of == "original" else x * mask
    sigma = float(src.std()) if x.numel() > 1 else float(src.abs().sum())
    bits = torch.finfo(delta.dtype).bits if delta.dtype.is_floating_point else 32
    return CompeftTensor(signs, alpha * sigma, bits)


def relative_error(delta: torch.Tensor, approx: torch.Tensor) -> float:
    """‖Δ − Δ̂‖_F / ‖Δ‖_F (0 for a zero Δ reconstructed as zero)."""
    d = delta.double()
    norm = float(d.norm())
    diff = float((d - approx.double()).norm())
    return diff / norm if norm > 0 else diff


@dataclass(frozen=True)
class CompeftEntry:
    name: str
    numel: int
    nnz: int
    scale: float
    bits: dict[str, float]
    rel_error: float


def compeft_adapter(
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    density: float,
    alpha: float = 1.0,
    std_of: StdOf = "original",
    overwrite: int | bool = False,
) -> tuple[list[CompeftEntry], dict[str, float]]:
    """Compress every LoRA factor of a PEFT adapter; write the decompressed adapter.

    Returns the per-factor entries and, per module, the relative error of the module's
    ΔW = s · B̂ Â against the original s · B A.
    """
    from splice.io.output_folder import OutputFolder
    from splice.lora_merge.adapters import load_adapter
    from splice.lora_merge.factors import LoraFactors
    from splice.lora_merge.peft_writer import write_adapter_files

    if not 0 <= density <= 1:
        raise MergeValidationError(f"density = {density} must be in [0, 1]")
    folder = OutputFolder(out_dir, overwrite=overwrite, inputs=[adapter_dir]).check()
    adapter = load_adapter(adapter_dir)
    entries: list[CompeftEntry] = []
    module_errors: dict[str, float] = {}
    out: dict[str, LoraFactors] = {}
    for module, f in sorted(adapter.modules.items()):
        parts = []
        for part, t in (("lora_B", f.b), ("lora_A", f.a)):
            c = compeft_compress(t, density, alpha, std_of)
            approx = c.decompress()
            entries.append(
                CompeftEntry(
                    f"{module}.{part}", c.numel, c.nnz, c.scale, c.bits(), relative_error(t, approx)
                )
            )
            parts.append(approx)
        out[module] = LoraFactors(parts[0], parts[1], f.scale)
        module_errors[module] = relative_error(f.dense(), out[module].dense())
    with folder as tmp:
        write_adapter_files(tmp, out, adapter.embedding, adapter.raw_config)
    return entries, module_errors
