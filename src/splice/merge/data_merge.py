"""Merging with data statistics: the Python entry point of the data-aware methods.

    merged = merge_with_statistics("regmean", [sd_a, sd_b], [gram_a, gram_b], alpha=0.9)
    grafted = merge_with_statistics("fisher_graft", [sd_a, sd_b], [f_a, f_b], base=sd_0,
                                    density=0.2)

``models`` are state dicts (``model.state_dict()``) with the same names and shapes;
``statistics`` holds one dict (or safetensors path, `splice.merge.data_stats`) per model.
Every statistic is checked before any tensor is merged: it must name a tensor of the models,
have the shape its kind requires (Fisher: the tensor's shape; Gram: d_in x d_in for a 2-D
weight of shape d_out x d_in) and be finite. Then each tensor is merged by the registered
method exactly as the streaming engine would (`MergeContext` with the method's
`DataStatistic` answered), so the per-tensor method stays the one implementation.
Non-floating tensors (integer buffers) are copied from the first model. A method that needs
a base model (``fisher_graft``) takes it as ``base``, a state dict with the models' tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from splice.errors import MergeValidationError
from splice.merge.data_stats import load_statistics
from splice.merge.registry import MergeContext, get_method, resolve_params
from splice.merge.stats import DataStatistic, DataStats

Statistics = Mapping[str, Tensor] | str | Path


def merge_with_statistics(
    method: str,
    models: Sequence[Mapping[str, Tensor]],
    statistics: Sequence[Statistics],
    *,
    seed: int = 0,
    base: Mapping[str, Tensor] | None = None,
    **params: Any,
) -> dict[str, Tensor]:
    """Merge ``models`` with ``method`` (a data-aware dense method such as ``fisher`` or
    ``regmean``), given each model's statistics; returns the merged state dict."""
    m = get_method(method)
    if m.needs_base and base is None:
        raise MergeValidationError(f"method '{method}' needs a base model: pass base=")
    if not m.accepts(len(models)):
        raise MergeValidationError(f"method '{method}' takes {m.model_count()} models")
    # Parameters checked before any statistic is read.
    resolve_params(m.params, params, len(models), f"method '{method}'")
    if not m.data_statistics:
        raise MergeValidationError(f"method '{method}' does not use data statistics")
    if len(m.data_statistics) > 1:
        raise MergeValidationError(f"method '{method}' needs several statistics: unsupported")
    request = DataStatistic(m.data_statistics[0])
    if len(statistics) != len(models):
        raise MergeValidationError(
            f"{len(statistics)} statistics for {len(models)} models; give one per model"
        )
    names = _common_names(models if base is None or not m.needs_base else [*models, base])
    stats = [load_statistics(s) if isinstance(s, (str, Path)) else dict(s) for s in statistics]
    floats = [n for n in names if models[0][n].is_floating_point()]
    shapes = {n: tuple(models[0][n].shape) for n in floats}
    norms = tuple(check_statistics(request.kind, s, shapes, i) for i, s in enumerate(stats))
    stats = [_with_tied_names(s, sd) for s, sd in zip(stats, models, strict=True)]
    out: dict[str, Tensor] = {}
    for name in names:
        first = models[0][name]
        if name not in floats:
            out[name] = first.clone()
            continue
        answer = DataStats(tuple(s.get(name) for s in stats), norms)
        ctx = MergeContext(tensor_name=name, seed=seed, model_stats={request: answer})
        tensors = [sd[name].detach().float().clone() for sd in models]
        b = base[name].detach().float().clone() if m.needs_base and base is not None else None
        out[name] = m(b, tensors, ctx, **params).to(first.dtype)
    return out


def _common_names(models: Sequence[Mapping[str, Tensor]]) -> list[str]:
    names = list(models[0])
    for i, sd in enumerate(models[1:], start=1):
        if set(sd) != set(names):
            diff = sorted(set(sd) ^ set(names))
            raise MergeValidationError(f"model {i} and model 0 differ in tensors: {diff[:5]}")
        for n in names:
            if sd[n].shape != models[0][n].shape:
                raise MergeValidationError(
                    f"tensor '{n}': model {i} has shape {tuple(sd[n].shape)}, model 0 "
                    f"{tuple(models[0][n].shape)}"
                )
    return names


def _with_tied_names(stats: dict[str, Tensor], model: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``stats`` with tied tensors (one storage under two names in the state dict, e.g. tied
    input and output embeddings; `nn.Module.named_parameters` lists only the first) sharing
    their statistic."""
    by_storage = {
        (t.data_ptr(), tuple(t.shape)): name for name, t in model.items() if name in stats
    }
    out = dict(stats)
    for name, t in model.items():
        twin = by_storage.get((t.data_ptr(), tuple(t.shape)))
        if name not in out and twin is not None and t.numel() > 0:
            out[name] = stats[twin]
    return out


def check_statistics(
    kind: str, stats: Mapping[str, Tensor], shapes: Mapping[str, tuple[int, ...]], i: int
) -> float:
    """Validate model ``i``'s statistics of ``kind`` against the shapes of the floating
    tensors to merge (names, shapes, finite, Fisher non-negative); return their L2 norm."""
    if not stats:
        raise MergeValidationError(f"model {i}: the {kind} statistics are empty")
    total = 0.0
    for name, s in stats.items():
        if name not in shapes:
            raise MergeValidationError(
                f"model {i}: {kind} statistic '{name}' names no floating tensor of the models"
            )
        shape = shapes[name]
        if kind == "fisher":
            want = shape
        elif len(shape) != 2:
            raise MergeValidationError(
                f"model {i}: gram statistic '{name}' is for a tensor of shape {shape}; "
                "Gram matrices belong to 2-D linear weights"
            )
        else:
            want = (shape[1], shape[1])
        if tuple(s.shape) != want:
            raise MergeValidationError(
                f"model {i}: {kind} statistic '{name}' has shape {tuple(s.shape)}, expected {want}"
            )
        if not bool(torch.isfinite(s).all()):
            raise MergeValidationError(f"model {i}: {kind} statistic '{name}' is not finite")
        if kind == "fisher" and bool((s < 0).any()):
            raise MergeValidationError(f"model {i}: fisher statistic '{name}' is negative")
        total += float(s.double().square().sum())
    return total**0.5
