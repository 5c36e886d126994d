"""Extract a PEFT LoRA adapter from a full fine-tune: ΔW = W_ft − W_base ≈ B @ A per tensor.

Per 2-D `*.weight` tensor present in both checkpoints, streamed one tensor at a time through
the streaming driver's reader loop (`splice.engine.driver`; only one ΔW in memory), the
factors written as a PEFT folder (`splice.peft.lora_writer`):

    ΔW ≈ U_k S_k V_kᵀ,   B = U_k S_k (out×k),   A = V_kᵀ (k×in),   written with alpha = k

- rank mode (`rank=r`): randomized SVD, `torch.svd_lowrank(ΔW, q=min(r + oversample,
  min(out, in)), niter)` under a fixed seed (torch's global RNG forked and seeded with `seed`,
  so runs are reproducible and leave the caller's RNG alone); defaults oversample=10,
  niter=2 power iterations (Halko et al. 2011); k = r.
- energy mode (`energy=e`): k = the smallest rank with Σ_{i≤k} σ_i² ≥ e · ‖ΔW‖_F² (the
  fraction of squared Frobenius norm kept), capped at `max_rank`. The σ_i come from the
  randomized SVD with q = max_rank + oversample when max_rank leaves q < min(out, in), else
  from an exact SVD (float64); the total ‖ΔW‖_F² is always exact.
Reported per tensor: k and the relative error ‖ΔW − B A‖_F / ‖ΔW‖_F (computed exactly).

Which tensors: 2-D weights whose module name matches `targets` (a regex searched in the name,
default all) and not `exclude` (default: embeddings, whose LoRA layout differs: token and
position embeddings are skipped). Unchanged tensors (ΔW = 0) are left out. Tensors that are
not 2-D `*.weight` (norms, biases, …) but changed are skipped and reported with their relative
change — not saved as modules_to_save. `fan_in_fan_out=True` is for checkpoints that store
weights in×out (GPT-2 Conv1D): ΔWᵀ is factored. Target modules are written as full module
names, so the checkpoint's tensor names must be the model's module paths.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from splice.delta import LowRank
from splice.engine.driver import Sources, passes
from splice.errors import MergeValidationError
from splice.io.finite import numerical_errors
from splice.io.output_folder import OutputFolder
from splice.peft import write_adapter_files

DEFAULT_EXCLUDE = (
    r"(^|\.)(embed_tokens|wte|wpe|embed_positions|word_embeddings|position_embeddings)$"
)


@dataclass(frozen=True)
class ExtractedTensor:
    name: str
    rank: int
    rel_error: float


@dataclass
class ExtractReport:
    out_dir: Path
    tensors: list[ExtractedTensor] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    unchanged: int = 0


def _svd_lowrank(delta: torch.Tensor, q: int, niter: int, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(delta, q=q, niter=niter)
    return u, s, v.T


def lowrank_delta(
    delta: torch.Tensor,
    *,
    rank: int | None = None,
    energy: float | None = None,
    max_rank: int | None = None,
    oversample: int = 10,
    niter: int = 2,
    seed: int = 0,
) -> tuple[LowRank, float]:
    """(factors B, A of rank k, relative Frobenius error) for one 2-D delta."""
    if (rank is None) == (energy is None):
        raise MergeValidationError("give exactly one of rank and energy")
    d = delta.double()
    full = min(d.shape)
    if rank is not None:
        u, s, vh = _svd_lowrank(d, min(rank + oversample, full), niter, seed)
        k = min(rank, s.numel())
    else:
        assert energy is not None
        q = full if max_rank is None else min(max_rank + oversample, full)
        if q < full:
            u, s, vh = _svd_lowrank(d, q, niter, seed)
        else:
            u, s, vh = torch.linalg.svd(d, full_matrices=False)
        total = float((d * d).sum())
        cum = torch.cumsum(s * s, 0)
        reached = (cum >= energy * total * (1 - 1e-12)).nonzero()
        k = int(reached[0]) + 1 if reached.numel() else s.numel()
        if max_rank is not None:
            k = min(k, max_rank)
    k = max(k, 1)
    b, a = u[:, :k] * s[:k], vh[:k]
    norm = float(d.norm())
    err = float((d - b @ a).norm()) / norm if norm > 0 else 0.0
    return LowRank(b.float(), a.float()), err


def extract_lora(
    base: str | Path,
    model: str | Path,
    out_dir: str | Path,
    *,
    rank: int | None = None,
    energy: float | None = None,
    max_rank: int | None = None,
    targets: str | None = None,
    exclude: str | None = DEFAULT_EXCLUDE,
    fan_in_fan_out: bool = False,
    oversample: int = 10,
    niter: int = 2,
    seed: int = 0,
    overwrite: int | bool = False,
    allow_nonfinite: bool = False,
) -> ExtractReport:
    """Extract a LoRA adapter (PEFT folder at `out_dir`) from `model` − `base`. An input
    tensor holding NaN / ±inf is a NonFiniteError naming it (its SVD would fail), as is a
    non-finite factor in the output, unless ``allow_nonfinite``."""
    if (rank is None) == (energy is None):
        raise MergeValidationError("give exactly one of --rank and --energy")
    if rank is not None and rank < 1:
        raise MergeValidationError(f"rank = {rank} must be at least 1")
    if energy is not None and not 0 < energy <= 1:
        raise MergeValidationError(f"energy = {energy} must be in (0, 1]")
    if max_rank is not None and max_rank < 1:
        raise MergeValidationError(f"max_rank = {max_rank} must be at least 1")
    if oversample < 0 or niter < 0:
        raise MergeValidationError("oversample and niter must be non-negative")
    try:
        target_re = re.compile(targets) if targets else None
        exclude_re = re.compile(exclude) if exclude else None
    except re.error as e:
        raise MergeValidationError(f"bad --targets/--exclude regex: {e}") from None
    out = Path(out_dir)
    folder = OutputFolder(out, overwrite=overwrite, inputs=[base, model]).check()
    report = ExtractReport(out)
    svd = dict(
        rank=rank, energy=energy, max_rank=max_rank, oversample=oversample, niter=niter, seed=seed
    )
    modules: dict[str, LowRank] = {}
    with Sources.open([base, model], allow_nonfinite=allow_nonfinite) as src:
        base_r, ft_r = src[base], src[model]
        base_names = set(base_r.names())
        missing = [n for n in ft_r.names() if n not in base_names]
        if missing:
            raise MergeValidationError(
                f"{ft_r.path}: {len(missing)} tensors are not in the base (e.g. '{missing[0]}')"
            )
        names = ft_r.names()

        def step(i: int) -> tuple[LowRank, float] | str | None:
            """One tensor: (factors, relative error), why it is skipped, or None."""
            name = names[i]
            bi, fi = base_r.info(name), ft_r.info(name)
            if bi.shape != fi.shape:
                raise MergeValidationError(
                    f"'{name}': shape {list(fi.shape)} in the fine-tune, "
                    f"{list(bi.shape)} in the base"
                )
            if not fi.dtype.is_floating_point:
                return None
            delta = src.read(model, name).float() - src.read(base, name).float()
            if not bool(delta.any()):
                report.unchanged += 1
                return None
            module = name.removesuffix(".weight")
            if not (name.endswith(".weight") and delta.dim() == 2):
                rel = float(delta.norm()) / max(float(src.read(base, name).float().norm()), 1e-30)
                return f"not a 2-D weight (relative change {rel:.3g})"
            if exclude_re is not None and exclude_re.search(module):
                return "excluded (--exclude)"
            if target_re is not None and not target_re.search(module):
                return "not selected by --targets"
            with numerical_errors(f"'{name}'"):
                factors, err = lowrank_delta(delta.T if fan_in_fan_out else delta, **svd)
            return factors, err

        # One thread: the randomized SVD seeds torch's (global) generator.
        for name, found in zip(names, passes(step, range(len(names)))):
            if isinstance(found, tuple):
                modules[name.removesuffix(".weight")] = found[0]
                report.tensors.append(ExtractedTensor(name, found[0].rank, found[1]))
            elif found is not None:
                report.skipped.append((name, found))
    if not modules:
        raise MergeValidationError("no 2-D weight differs between the base and the fine-tune")
    template = {
        "peft_type": "LORA",
        "base_model_name_or_path": str(base),
        "target_modules": sorted(modules),
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "lora_dropout": 0.0,
        "task_type": None,
        "inference_mode": True,
    }
    with folder as tmp:
        write_adapter_files(tmp, modules, {}, template, allow_nonfinite=allow_nonfinite)
    return report
