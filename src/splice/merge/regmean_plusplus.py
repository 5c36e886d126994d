"""RegMean++ (Nguyen et al. 2025, "RegMean++: Enhancing Effectiveness and Generalization of
Regression Mean for Model Merging"): RegMean whose Gram matrices are collected on the merged
model's own activations, block by block.

RegMean (`splice.merge.methods.regmean`) merges every linear layer j of block l from the
Grams of its inputs X_i^(l,j) in candidate model i:

    W_M^(l,j)ᵀ = (Σ_i G̃_i^(l,j))⁻¹ Σ_i G̃_i^(l,j) W_i^(l,j)ᵀ,   G_i = X_iᵀ X_i,
    G̃ = α G + (1 − α) diag(G),

with X_i^(l) = f_i^(l−1)(X_i^(l−1)): the activations candidate i's own earlier blocks give
on its data. RegMean++ takes the block inputs from the *merged* model instead,

    X_i^(l) = f_M^(l−1)(X_i^(l−1))   (the merged blocks < l run on candidate i's data),

so block l is merged for the inputs it will actually see. Inside block l the linear inputs
still come from candidate i's own block (its attention / MLP sub-layers) run on that merged
input, as in the authors' code (`RegMeanAlgorithmPlusPlus`: candidate layer forwarded on
the merge model's activations, hooks on its nn.Linear modules).

Choices (from the authors' code, FusionBench-based, unless said otherwise):

- A "block" is an element of the model's block list (an ``nn.ModuleList``: BERT's
  ``encoder.layer``, Llama's ``model.layers``), found automatically when the model has exactly
  one ``nn.ModuleList`` holding linear layers, else named with ``layers=``.
- Tensors outside the blocks (embeddings, final norms, heads) are averaged first, so the
  merged model's embeddings feed block 0 (the authors average the embeddings and keep the
  pretrained model's other outside tensors; splice has no base model here and averages them
  all).
- Grams: every ``nn.Linear`` in the block not matching an ``exclude`` pattern (searched in the
  full module name), every position of every example a row (padding included), divided by the
  row count (``reduction="mean"``, the authors' running mean; "sum" keeps XᵀX). Tensors of a
  block without a Gram (biases, norms, excluded linears) are averaged. Each block is merged by
  splice's ``regmean`` method (float64 solve), parameter ``alpha`` as there (default 0.9).
- Block inputs are cached (``cache_activations=True``, the default, as the authors do):
  one forward of the merged model per batch captures block 0's hidden states and every
  block's other call arguments; after block l is merged, the cached hidden states are pushed
  through it to become block l+1's inputs (`splice.merge.block_inputs`, which checks that
  the blocks form a chain and replays exactly; if not, it falls back with a warning). With
  ``cache_activations=False``, or on the fallback, nothing is cached: for block l each batch
  runs through the merged model up to block l, where a forward pre-hook hands block l's
  exact inputs (positional and keyword) to candidate i's block l and stops the forward,
  exact for any architecture whose blocks are called in list order.

With one block, and identical tensors outside it, RegMean++ is RegMean (a test checks this).

Memory: the candidate models and one merged copy, one block's Grams per model (one float32
d_in x d_in per linear of the block), not the whole model's, and with the cache every
batch's hidden states (examples × positions × width floats per model).
Time: with the cache, 2L block forwards per batch and model for L blocks (the candidate's
block for the Grams, the merged block to advance), plus one capture forward; without it,
block l costs a forward through blocks 0..l: about L²/2 block forwards per batch. No
backward pass.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from splice.errors import DataError, MergeValidationError
from splice.merge.block_inputs import BlockInputs
from splice.merge.data_merge import merge_with_statistics
from splice.merge.data_stats import ForwardFn, default_forward


class _ReachedBlock(Exception):
    """Raised by the pre-hook to stop the merged model's forward at the block in hand."""


def find_block_list(model: nn.Module) -> str:
    """The dotted name of the model's only ``nn.ModuleList`` of blocks holding linear layers."""
    found = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList)
        and len(m) > 0
        and any(isinstance(x, nn.Linear) for x in m.modules())
    ]
    outer = [n for n in found if not any(n.startswith(f"{o}.") for o in found if o != n)]
    if len(outer) != 1:
        raise MergeValidationError(
            f"cannot tell which module list holds the model's blocks (found {outer or 'none'}); "
            "pass layers='name.of.the.ModuleList'"
        )
    return outer[0]


def regmean_plusplus(
    models: Sequence[nn.Module],
    batches: Sequence[Iterable[Any]],
    *,
    alpha: float = 0.9,
    layers: str | None = None,
    forward: ForwardFn = default_forward,
    exclude: Sequence[str] = (),
    reduction: Literal["mean", "sum"] = "mean",
    progress: bool = False,
    on_block: Callable[[int, list[dict[str, Tensor]]], None] | None = None,
    cache_activations: bool = True,
) -> dict[str, Tensor]:
    """Merge ``models`` (same architecture) with RegMean++; ``batches[i]`` is candidate i's
    data, iterated once per block (so a list, not a generator). Returns the merged state dict.
    ``on_block(l, grams)`` is called with each block's Grams (one dict per model)."""
    if not models:
        raise MergeValidationError("regmean_plusplus needs at least one model")
    if len(batches) != len(models):
        raise MergeValidationError(
            f"{len(batches)} batch lists for {len(models)} models; give one per model"
        )
    for i, b in enumerate(batches):
        if iter(b) is b:
            raise MergeValidationError(
                f"batches[{i}] is an iterator; RegMean++ reads the data once per block, pass a "
                "list of batches"
            )
    if not 0 <= alpha <= 1:
        raise MergeValidationError(f"alpha = {alpha} must be in [0, 1]")
    if reduction not in ("mean", "sum"):
        raise MergeValidationError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
    patterns = [re.compile(p) for p in exclude]
    name = layers if layers is not None else find_block_list(models[0])
    blocks = [_block_list(m, name) for m in models]
    if len({len(b) for b in blocks}) != 1:
        raise MergeValidationError(f"the models have different numbers of blocks in '{name}'")
    sds = [m.state_dict() for m in models]
    _check_same_tensors(sds)

    merged_model = copy.deepcopy(models[0]).eval()
    merged_blocks = _block_list(merged_model, name)
    outside = {n: _mean([sd[n] for sd in sds]) for n in sds[0] if not n.startswith(f"{name}.")}
    merged_model.load_state_dict(outside, strict=False)
    out = dict(outside)
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    from tqdm.auto import tqdm

    try:
        cache = None
        if cache_activations:
            cache = BlockInputs.capture(merged_model, merged_blocks, batches, forward)
            if cache is None:
                warnings.warn(
                    f"regmean++: the blocks of '{name}' do not form a chain that can be "
                    "replayed from cached inputs; recomputing each block's inputs from the "
                    "start (slower, same result)",
                    stacklevel=2,
                )
        for layer in tqdm(
            range(len(merged_blocks)), desc="regmean++", unit="block", disable=not progress
        ):
            prefix = f"{name}.{layer}."
            grams = [
                _block_grams(
                    merged_model,
                    merged_blocks[layer],
                    blocks[i][layer],
                    batches[i],
                    forward,
                    prefix,
                    patterns,
                    reduction,
                    i,
                    (lambda blk, i=i, layer=layer: cache.run(blk, layer, i))
                    if cache is not None
                    else None,
                )
                for i in range(len(models))
            ]
            names = [n for n in sds[0] if n.startswith(prefix)]
            block_sds = [{n: sd[n] for n in names} for sd in sds]
            if any(grams):
                merged = merge_with_statistics("regmean", block_sds, grams, alpha=alpha)
            else:  # every linear of the block excluded: RegMean averages it
                merged = {n: _mean([sd[n] for sd in block_sds]) for n in names}
            merged_model.load_state_dict(merged, strict=False)
            if cache is not None and layer + 1 < len(merged_blocks):
                cache.advance(merged_blocks[layer], layer)
            out.update(merged)
            if on_block is not None:
                on_block(layer, grams)
    finally:
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)
    return {n: out[n] for n in sds[0]}


def _block_list(model: nn.Module, name: str) -> nn.ModuleList:
    try:
        found = model.get_submodule(name)
    except AttributeError:
        raise MergeValidationError(f"the model has no module '{name}'") from None
    if not isinstance(found, nn.ModuleList) or len(found) == 0:
        raise MergeValidationError(f"'{name}' is not a non-empty nn.ModuleList of blocks")
    return found


def _check_same_tensors(sds: list[dict[str, Tensor]]) -> None:
    for i, sd in enumerate(sds[1:], start=1):
        if set(sd) != set(sds[0]):
            diff = sorted(set(sd) ^ set(sds[0]))[:5]
            raise MergeValidationError(f"model {i} and model 0 differ in tensors: {diff}")
        for n, t in sd.items():
            if t.shape != sds[0][n].shape:
                raise MergeValidationError(f"tensor '{n}': model {i} has shape {tuple(t.shape)}")


def _mean(tensors: list[Tensor]) -> Tensor:
    if not tensors[0].is_floating_point():
        return tensors[0].clone()
    return torch.stack([t.detach().float() for t in tensors]).mean(dim=0).to(tensors[0].dtype)


def _block_grams(
    merged_model: nn.Module,
    merged_block: nn.Module,
    candidate_block: nn.Module,
    batches: Iterable[Any],
    forward: ForwardFn,
    prefix: str,
    patterns: list[re.Pattern[str]],
    reduction: str,
    index: int,
    cached: Callable[[nn.Module], int] | None = None,
) -> dict[str, Tensor]:
    """Grams of candidate ``index``'s block linears on the merged model's block inputs:
    from the cache (``cached(block)`` runs the block on them, returns the batch count) or
    by running the merged model up to the block."""
    sums: dict[str, Tensor] = {}
    rows: dict[str, int] = {}

    def gram_hook(key: str) -> Callable[..., None]:
        def accumulate(module: nn.Module, inputs: tuple[Tensor, ...], output: Any) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            if key not in sums:
                sums[key] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
                rows[key] = 0
            sums[key].addmm_(x.T, x)
            rows[key] += x.shape[0]

        return accumulate

    handles = [
        m.register_forward_hook(gram_hook(f"{prefix}{sub}.weight"))
        for sub, m in candidate_block.named_modules()
        if isinstance(m, nn.Linear) and not any(p.search(f"{prefix}{sub}") for p in patterns)
    ]
    try:
        if cached is not None:
            seen = cached(candidate_block)
        else:
            seen = _run_to_block(merged_model, merged_block, candidate_block, batches, forward)
    finally:
        for h in handles:
            h.remove()
    if seen < 0:
        raise MergeValidationError(
            f"the forward of a batch of model {index} never reached block '{prefix[:-1]}'"
        )
    if seen == 0:
        raise DataError(f"model {index}: no batches to compute Gram matrices on")
    return {k: (s / rows[k] if reduction == "mean" else s) for k, s in sums.items()}


def _run_to_block(
    merged_model: nn.Module,
    merged_block: nn.Module,
    candidate_block: nn.Module,
    batches: Iterable[Any],
    forward: ForwardFn,
) -> int:
    """Run each batch through ``merged_model`` up to ``merged_block``, whose exact inputs
    go to ``candidate_block`` instead; the number of batches, −1 if a forward never got
    there."""

    def reach(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        candidate_block(*args, **kwargs)
        raise _ReachedBlock

    handle = merged_block.register_forward_pre_hook(reach, with_kwargs=True)
    seen = 0
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    forward(merged_model, batch)
                except _ReachedBlock:
                    seen += 1
                    continue
                return -1
    finally:
        handle.remove()
    return seen
