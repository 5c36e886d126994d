"""Statistics collected by running a model on data, for the data-aware merge methods.

Two statistics, each a ``{name: tensor}`` dict that `save_statistics` writes as one
safetensors file per model and `splice.merge.data_merge.merge_with_statistics` reads back:

Diagonal Fisher (`collect_fisher`, for ``fisher`` merging; Matena & Raffel 2022)
    F_θ = (1/N) Σ_n (∂ ℓ_n / ∂θ)²,   one tensor per trainable parameter, same shape,

where ℓ_n is example n's loss as returned by ``loss_fn`` (negative log-likelihood of its
label: the *empirical* Fisher). ``per_example=True`` (the default) takes one gradient per
example (B backward passes per batch through the batch's shared graph). ``per_example=False``
is the *batch approximation* (FusionBench's implementation): the square of each batch's
summed gradient, F ≈ (1/N) Σ_batches (Σ_{n in batch} ∂ℓ_n/∂θ)², one backward pass per batch;
it equals the per-example Fisher for batches of one and otherwise adds the cross terms.
Matena & Raffel's own code takes the expectation over the model's predicted label
distribution instead of the true label (the "exact" Fisher, Σ_y p(y|x) (∂ log p(y|x)/∂θ)²);
that variant is not offered yet.

Gram matrices (`collect_gram`, for ``regmean``; Jin et al. 2023)
    G = Σ_rows x xᵀ = XᵀX  (reduction "sum"),   or XᵀX / rows  (reduction "mean", default)

for the inputs X (rows = every position of every example, padding included, as in
FusionBench) of every ``torch.nn.Linear`` module, stored under the module's weight name
(``"encoder.layer.0.attention.q.weight"``). "mean" is FusionBench's and MergeLM's
reduction (each model's Gram averaged over its own rows, so models weigh equally whatever
their data size); "sum" is the paper's XᵀX, under which RegMean of linear regressions equals
the least-squares fit on the union of their data. A linear layer the batches never reach
has no Gram (RegMean averages it). Other layer types (HF's GPT-2 ``Conv1D``, embeddings)
get no Gram.

Memory bound: statistics are running sums, so memory does not grow with the number of
batches. Fisher: one float32 tensor per parameter (the model's size again) plus one
gradient. Gram: one float32 d_in x d_in matrix per linear layer (4 · d_in² bytes each).
Both put the model in eval mode while collecting (dropout off) and restore its mode.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from splice.errors import DataError, MergeValidationError

LossFn = Callable[[nn.Module, Any], Tensor]
ForwardFn = Callable[[nn.Module, Any], Any]


def default_forward(model: nn.Module, batch: Any) -> Any:
    """``model(**batch)`` for a mapping (an HF batch), else ``model(batch)``."""
    return model(**batch) if isinstance(batch, Mapping) else model(batch)


def collect_fisher(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: LossFn,
    *,
    per_example: bool = True,
) -> dict[str, Tensor]:
    """The diagonal empirical Fisher of every trainable parameter, averaged over examples.

    ``loss_fn(model, batch)`` returns the per-example losses, a 1-D tensor (one per example).
    """
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise MergeValidationError("the model has no trainable parameters to take a Fisher of")
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params}
    weights = [p for _, p in params]
    examples = 0
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            losses = loss_fn(model, batch)
            if losses.dim() != 1 or losses.numel() == 0:
                raise MergeValidationError(
                    f"loss_fn must return one loss per example (a non-empty 1-D tensor), "
                    f"got shape {tuple(losses.shape)}"
                )
            if not bool(torch.isfinite(losses).all()):
                raise DataError("a loss in the Fisher batches is not finite")
            rows = [losses[i] for i in range(losses.numel())] if per_example else [losses.sum()]
            for k, loss in enumerate(rows):
                grads = torch.autograd.grad(
                    loss, weights, retain_graph=k < len(rows) - 1, allow_unused=True
                )
                for (n, _), g in zip(params, grads, strict=True):
                    if g is not None:
                        sums[n].add_(g.detach().float().square())
            examples += losses.numel()
    finally:
        model.train(was_training)
    if examples == 0:
        raise DataError("no examples to compute the Fisher on (the batches are empty)")
    return {n: s.div_(examples) for n, s in sums.items()}


def collect_gram(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    forward: ForwardFn = default_forward,
    reduction: Literal["mean", "sum"] = "mean",
    exclude: Sequence[str] = (),
) -> dict[str, Tensor]:
    """The Gram matrix of the inputs of every ``nn.Linear`` (not matching an ``exclude``
    regular expression, searched in the module name), keyed by its weight's name."""
    if reduction not in ("mean", "sum"):
        raise MergeValidationError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
    patterns = [re.compile(p) for p in exclude]
    grams: dict[str, Tensor] = {}
    rows: dict[str, int] = {}

    def hook(name: str) -> Callable[..., None]:
        def accumulate(module: nn.Module, inputs: tuple[Tensor, ...], output: Any) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            if name not in grams:
                grams[name] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
                rows[name] = 0
            grams[name].addmm_(x.T, x)
            rows[name] += x.shape[0]

        return accumulate

    handles = [
        module.register_forward_hook(hook(name))
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not any(p.search(name) for p in patterns)
    ]
    if not handles:
        raise MergeValidationError("the model has no linear layers to collect Gram matrices of")
    was_training = model.training
    model.eval()
    seen = 0
    try:
        with torch.no_grad():
            for batch in batches:
                forward(model, batch)
                seen += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if seen == 0:
        raise DataError("no batches to compute Gram matrices on")
    out = {}
    for name, g in grams.items():
        out[f"{name}.weight" if name else "weight"] = (
            g.div_(rows[name]) if reduction == "mean" else g
        )
    return out


def save_statistics(
    stats: Mapping[str, Tensor], path: str | Path, metadata: Mapping[str, str] | None = None
) -> None:
    """Write one model's statistics as a safetensors file, atomically: the bytes go to a
    temporary file beside ``path`` (fsynced), which is then renamed onto ``path``, so a
    crash never leaves a half-written statistics file. ``metadata`` (strings) goes into the
    file's header (e.g. the kind, the model and the data it was collected on)."""
    from safetensors.torch import save

    from splice.io.output_folder import write_file_atomically

    data = save(
        {k: v.detach().contiguous().cpu() for k, v in stats.items()},
        metadata=dict(metadata) if metadata else None,
    )
    write_file_atomically(Path(path), data)


def load_statistics(path: str | Path) -> dict[str, Tensor]:
    """Read one model's statistics written by `save_statistics`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from splice.errors import CheckpointError

    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{path}: cannot read statistics: {e}") from None
