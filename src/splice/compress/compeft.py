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
(`splice.delta.topk.topk_mask`).

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
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field

from splice.compress.registry import compression_method, get_compression_method
from splice.delta import Dense, Ternary, ternarize

StdOf = Literal["original", "sparse"]


def compeft_bits(t: Ternary, source_bits: int) -> dict[str, float]:
    """Sizes in bits of a ComPEFT-compressed tensor: dense original, 2-bit ternary,
    entropy-coded positions (see the module docstring)."""
    n, k = t.signs.numel(), int(t.signs.count_nonzero())
    p = k / n if n else 0.0
    h = 0.0 if p in (0.0, 1.0) else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))
    return {
        "dense": float(n * source_bits),
        "ternary_2bit": float(2 * n + 32),
        "entropy": n * h + k + 32,
    }


def compeft_compress(
    delta: torch.Tensor, density: float, alpha: float = 1.0, std_of: StdOf = "original"
) -> Ternary:
    """Keep the top `density` fraction of |Δ|, ternarize to sign × α · σ. The parameters are
    checked by the registered method's schema (`compeft` below)."""
    rule = "std" if std_of == "original" else "std_kept"
    return ternarize(Dense(delta.detach().float()), density, rule, alpha)


@compression_method("compeft", inputs="lora_adapter")
def compeft(
    *,
    density: Annotated[float, Field(ge=0, le=1, description="fraction of entries kept")],
    alpha: Annotated[float, Field(gt=0, description="scale multiplier α")] = 1.0,
    std_of: StdOf = "original",
) -> Callable[[torch.Tensor], Ternary]:
    """ComPEFT: top-k sparsification + ternary signs with one scale per tensor."""
    return partial(compeft_compress, density=density, alpha=alpha, std_of=std_of)


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
    allow_nonfinite: bool = False,
) -> tuple[list[CompeftEntry], dict[str, float]]:
    """Compress every LoRA factor of a PEFT adapter; write the decompressed adapter.

    Returns the per-factor entries and, per module, the relative error of the module's
    ΔW = s · B̂ Â against the original s · B A. NaN / ±inf in the adapter's factors is a
    NonFiniteError naming the tensor unless ``allow_nonfinite``.
    """
    from splice.delta import LowRank
    from splice.io.output_folder import OutputFolder
    from splice.peft import read_lora_adapter, write_adapter_files

    method = get_compression_method("compeft")
    kernel = method.kernel(method.resolve(dict(density=density, alpha=alpha, std_of=std_of), 1))
    folder = OutputFolder(out_dir, overwrite=overwrite, inputs=[adapter_dir]).check()
    adapter = read_lora_adapter(adapter_dir, allow_nonfinite=allow_nonfinite)
    entries: list[CompeftEntry] = []
    module_errors: dict[str, float] = {}
    out: dict[str, LowRank] = {}
    for module, f in sorted(adapter.modules.items()):
        parts = []
        for part, t in (("lora_B", f.b), ("lora_A", f.a)):
            c = kernel(t)
            approx = c.to_dense()
            source_bits = torch.finfo(t.dtype).bits if t.dtype.is_floating_point else 32
            nnz = int(c.signs.count_nonzero())
            bits = compeft_bits(c, source_bits)
            entries.append(
                CompeftEntry(
                    f"{module}.{part}", t.numel(), nnz, c.gamma, bits, relative_error(t, approx)
                )
            )
            parts.append(approx)
        out[module] = LowRank(parts[0], parts[1], f.scaling)
        module_errors[module] = relative_error(f.to_dense(), out[module].to_dense())
    with folder as tmp:
        write_adapter_files(
            tmp, out, adapter.embedding, adapter.raw_config, allow_nonfinite=allow_nonfinite
        )
    return entries, module_errors
