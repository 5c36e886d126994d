"""Compute precision of the bench's forward passes: float32, or bfloat16 autocast.

``auto`` picks bfloat16 autocast where the CPU multiplies bfloat16 natively (AMX or
AVX512-BF16, as torch reports), float32 elsewhere (emulated bfloat16 is slower than
float32). Measured on a 2-core Xeon with AMX: MiniLM evaluation 3-4x faster, training
~1.3x. Autocast keeps the weights, optimizer state and therefore every task vector in
float32; only matrix products run in bfloat16 (with float32 accumulation), the loss and
the heads in float32. The resolved precision is part of the expert cache key and of the
results, since it changes the numbers slightly.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

Precision = Literal["auto", "float32", "bfloat16"]


def native_bf16() -> bool:
    """Whether this CPU has bfloat16 matrix instructions (AMX tiles or AVX512-BF16)."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    for name in checks:
        fn = getattr(torch.cpu, name, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:  # a private torch helper: absent or failing means "no"
            continue
    return False


def resolve_precision(precision: Precision) -> str:
    if precision == "auto":
        return "bfloat16" if native_bf16() else "float32"
    return precision


def autocast(precision: str) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on CPU, or nothing."""
    if precision == "bfloat16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()
