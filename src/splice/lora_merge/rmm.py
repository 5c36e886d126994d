"""Reversible model merging of LoRA adapters (closest stated version of RMM).

Paper: Alipour & Mohammadi Amiri 2025, "Towards Reversible Model Merging For Low-rank
Weights" (arXiv 2510.14163). Instead of collapsing n low-rank task models into one, RMM keeps
a compact basis of k "models" (k < n) and per-task coefficients, from which each task's
low-rank weights are recovered by a linear combination; basis and coefficients have a closed
form. The paper's full text was not reachable offline; what is implemented is the clearly
stated closest version:

For each module and each factor separately (B and A, the paper's "separate" treatment of
the two LoRA factors; the task scale s_i is folded into B first), stack the n tasks'
flattened factors as rows, X ∈ R^{n×D}, and take the best rank-k approximation
(Eckart–Young, via SVD X = U S Vᵀ):

    basis  Φ = V_kᵀ ∈ R^{k×D}    (orthonormal rows: k "basis models")
    coeffs C = X Φᵀ = U_k S_k ∈ R^{n×k}
    recover  X̂_i = C_i Φ,   i.e.  B̂_i = reshape(C^B_i Φ^B),  Â_i = reshape(C^A_i Φ^A)
    ΔŴ_i = B̂_i Â_i

With k = n recovery is exact; with k < n each factor is the orthogonal projection of the
task's factor onto the top-k principal directions (no centring), which minimizes
Σ_i ‖X_i − X̂_i‖². Adapters of different ranks are zero-padded to the largest rank (exact:
the padded columns of B and rows of A are zero). Stored as `rmm.safetensors`
(`<module>.lora_B.basis` k×out×r, `.lora_B.coeffs` n×k, the same for lora_A) plus `rmm.json`
(k, task adapter paths, the template adapter config, embedding flags).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from splice.delta import LowRank
from splice.errors import CheckpointError, MergeValidationError
from splice.io.finite import check_output, numerical_errors
from splice.io.output_folder import OutputFolder, write_bytes
from splice.io.safe_paths import allowed_root, member, shown
from splice.io.safetensors_reader import SafetensorsReader
from splice.io.textfile import load_json_object
from splice.peft import read_lora_adapters, write_lora_adapter

STORE_WEIGHTS = "rmm.safetensors"
STORE_INFO = "rmm.json"


@dataclass(frozen=True)
class RmmFactor:
    """One factor of one module: basis (k × *shape) and coefficients (n × k)."""

    basis: torch.Tensor
    coeffs: torch.Tensor

    def recover(self, task: int) -> torch.Tensor:
        k = self.basis.shape[0]
        return (self.coeffs[task] @ self.basis.reshape(k, -1)).reshape(self.basis.shape[1:])


def fit_factor(stack: list[torch.Tensor], k: int) -> RmmFactor:
    """Best rank-k basis and coefficients for the n same-shape tensors in `stack`."""
    x = torch.stack([t.reshape(-1).double() for t in stack])
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    k = min(k, s.numel())
    basis = vh[:k]
    coeffs = u[:, :k] * s[:k]
    return RmmFactor(basis.reshape(k, *stack[0].shape).float(), coeffs.float())


def _pad(f: LowRank, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    b = torch.zeros(f.b.shape[0], r, dtype=f.b.dtype)
    a = torch.zeros(r, f.a.shape[1], dtype=f.a.dtype)
    b[:, : f.rank] = f.b * f.scaling
    a[: f.rank] = f.a
    return b, a


def fit_module(tasks: list[LowRank], k: int) -> tuple[RmmFactor, RmmFactor]:
    """(B factor, A factor) of one module's n task LoRAs, each with a rank-k basis."""
    r = max(f.rank for f in tasks)
    padded = [_pad(f, r) for f in tasks]
    return fit_factor([b for b, _ in padded], k), fit_factor([a for _, a in padded], k)


def recover_module(fb: RmmFactor, fa: RmmFactor, task: int) -> LowRank:
    """Task `task`'s LoRA factors from the store (scale 1)."""
    return LowRank(fb.recover(task), fa.recover(task), 1.0)


def build_rmm(
    adapter_dirs: list[str | Path],
    k: int,
    out_dir: str | Path,
    *,
    overwrite: int | bool = False,
    allow_nonfinite: bool = False,
) -> Path:
    """Fit and save an RMM store of the adapters with k basis models. NaN / ±inf in an
    adapter or in the fitted store is a NonFiniteError unless ``allow_nonfinite``."""
    if not 1 <= k <= len(adapter_dirs):
        raise MergeValidationError(
            f"k = {k} must be between 1 and the {len(adapter_dirs)} adapters"
        )
    out = Path(out_dir)
    folder = OutputFolder(out, overwrite=overwrite, inputs=adapter_dirs).check()
    adapters = read_lora_adapters(adapter_dirs, allow_nonfinite=allow_nonfinite)
    tensors: dict[str, torch.Tensor] = {}
    for module in sorted(adapters[0].modules):
        with numerical_errors(f"module '{module}'"):
            fb, fa = fit_module([ad.modules[module] for ad in adapters], k)
        for part, f in (("lora_B", fb), ("lora_A", fa)):
            tensors[f"{module}.{part}.basis"] = f.basis.contiguous()
            tensors[f"{module}.{part}.coeffs"] = f.coeffs.contiguous()
    info: dict[str, Any] = {
        "format": "splice-rmm-1",
        "k": k,
        "tasks": [str(ad.path) for ad in adapters],
        "embedding": adapters[0].embedding,
        "adapter_config": adapters[0].raw_config,
    }
    if not allow_nonfinite:
        for name, t in tensors.items():
            check_output(t, name)
    with folder as tmp:
        write_bytes(tmp / STORE_WEIGHTS, save(tensors))
        write_bytes(tmp / STORE_INFO, (json.dumps(info, indent=2) + "\n").encode())
    return out


def load_rmm(
    store_dir: str | Path,
) -> tuple[dict[str, Any], dict[str, tuple[RmmFactor, RmmFactor]]]:
    """(info, {module: (B factor, A factor)}) of a saved store."""
    store = Path(store_dir)
    root = allowed_root(store)
    info_path, weights_path = member(store, STORE_INFO, root), member(store, STORE_WEIGHTS, root)
    if info_path is None or weights_path is None:
        raise CheckpointError(
            f"{store}: not a readable RMM store (no {STORE_INFO} or no {STORE_WEIGHTS})"
        )
    info = load_json_object(info_path, CheckpointError)
    with SafetensorsReader(weights_path) as reader:
        raw = {name: reader.read(name) for name in reader.names()}
    if info.get("format") != "splice-rmm-1":
        raise CheckpointError(f"{store}: unknown RMM store format {shown(info.get('format'))}")
    modules: dict[str, tuple[RmmFactor, RmmFactor]] = {}
    for key in raw:
        if key.endswith(".lora_B.basis"):
            m = key.removesuffix(".lora_B.basis")
            fb = RmmFactor(raw[f"{m}.lora_B.basis"], raw[f"{m}.lora_B.coeffs"])
            fa = RmmFactor(raw[f"{m}.lora_A.basis"], raw[f"{m}.lora_A.coeffs"])
            modules[m] = (fb, fa)
    return info, modules


def recover_adapter(
    store_dir: str | Path,
    task: int,
    out_dir: str | Path,
    *,
    overwrite: int | bool = False,
    allow_nonfinite: bool = False,
) -> Path:
    """Write task `task`'s recovered LoRA as a PEFT adapter folder (NaN / ±inf in it is a
    NonFiniteError unless ``allow_nonfinite``)."""
    info, modules = load_rmm(store_dir)
    n = len(info["tasks"])
    if not 0 <= task < n:
        raise MergeValidationError(f"task {task} out of range: the store holds tasks 0..{n - 1}")
    OutputFolder(out_dir, overwrite=overwrite, inputs=[store_dir]).check()
    factors = {m: recover_module(fb, fa, task) for m, (fb, fa) in modules.items()}
    return write_lora_adapter(
        out_dir,
        factors,
        info["embedding"],
        info["adapter_config"],
        overwrite=overwrite,
        inputs=[store_dir],
        allow_nonfinite=allow_nonfinite,
    )
