"""PLeaS: partial matching + least squares (Nasery et al., "PLeaS: Merging Models with
Permutations and Least Squares", CVPR 2025), for plain MLP chains.

Two MLPs A and B with the same layer shapes, trained from different starts, merged into one
MLP whose hidden layers may be wider, using a batch of unlabeled inputs X:

1. **Match.** Weight matching (`weight_matching`) aligns B to A; unit i of A is paired with
   unit i of the aligned B. The pair's score is the final cost C_k[i, π_k(i)] of its hidden
   width k (the official code scores pairs with the cost matrix of the matching it used,
   activation or weight matching; this is its weight-matching variant).
2. **Partial matching.** Per hidden width of n units, the round(f·n) pairs of highest score
   are *merged* (one unit each); the other n − m units are kept *separately* from both
   models. The merged model's width is m + 2(n − m), ordered [merged | A-only | B-only]. f is
   ``merge_fraction`` (the official code's ``ratios`` are the *unmerged* fraction 1 − f and
   pick pairs by a quantile; exactly round(f·n) pairs, ties by unit index, here).
3. **Initial weights** (the official `build_partial_merge_model`). With S_o the models an
   output group carries ({A, B} for merged units, {A} or {B} for separate ones; an
   unpermuted axis is one merged group) and S_i the same for the input group:
   W[o, i] = Σ_{m ∈ S_o ∩ S_i} W_m[o, i] / |S_o|, b[o] = Σ_{m ∈ S_o} b_m[o] / |S_o|.
   So merged rows average, merged rows reading separate units take half of that model's
   weights, A-only rows never read B-only units (and vice versa). At f = 0 the merged model
   computes exactly (f_A(x) + f_B(x)) / 2; at f = 1 it is the weight-matching average.
4. **Least squares, layer by layer.** For each linear layer, the inputs the merged layer
   should see are built from the *original* models' inputs to that layer (as the official
   code's default ``perm_gradmask``): [ (x_A + x_B)/2 on merged units, x_A on A-only,
   x_B on B-only ], and the targets likewise from their outputs (pre-activation):
   [ (o_A + o_B)/2, o_A, o_B ] (the logits are averaged). Each output row is solved over the
   inputs it may read (A-only rows never read B-only units), with its bias:
       min_w ‖Z w − t‖² + λ ‖w − w_init‖²,   λ = ridge · mean(diag(ZᵀZ)),
   in closed form (float64). The official code minimizes the same per-layer mean squared
   error with Adam from the initial weights, masking the forbidden blocks' gradients; the
   closed form is that problem's minimizer, and the small ridge toward the initial weights
   (ridge = 1e-3 by default) stands in for its implicit regularization by early stopping.

Scope: MLP chains (`linear_chain`) with one elementwise activation between layers (ReLU by
default). PLeaS for transformer blocks (the paper's ResNets and ViTs) is not here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from splice.merge.align.spec import AlignmentError, apply_permutation, linear_chain, mlp_spec
from splice.merge.align.weight_matching import cost_matrix, weight_matching


@dataclass(frozen=True)
class _Group:
    """One group of units of an axis: which models it carries and their unit indices."""

    models: tuple[int, ...]  # 0 = A, 1 = B
    index: Tensor


def _groups(n: int, merged: Tensor | None) -> list[_Group]:
    """[merged, A-only, B-only] for a permuted width; one merged group for an unpermuted one."""
    if merged is None:
        return [_Group((0, 1), torch.arange(n))]
    keep = torch.ones(n, dtype=torch.bool)
    keep[merged] = False
    separate = torch.arange(n)[keep]
    return [_Group((0, 1), merged), _Group((0,), separate), _Group((1,), separate)]


def _merged_units(cost: Tensor, perm: Tensor, fraction: float) -> Tensor:
    """The round(fraction·n) units of A whose matched pair scores highest, in unit order."""
    n = len(perm)
    score = cost[torch.arange(n), perm]
    m = round(fraction * n)
    order = sorted(range(n), key=lambda i: (-float(score[i]), i))
    return torch.tensor(sorted(order[:m]), dtype=torch.long)


def _gather(values: list[Tensor], groups: list[_Group], axis: int) -> Tensor:
    """Per group, the mean over its models of ``values[m]`` at its indices, concatenated."""
    parts = [
        sum(values[m].index_select(axis, g.index) for m in g.models) / len(g.models) for g in groups
    ]
    return torch.cat(parts, axis)


def _init_layer(
    w: list[Tensor], b: list[Tensor] | None, outs: list[_Group], ins: list[_Group]
) -> tuple[Tensor, Tensor | None]:
    """Step 3's weights (module docstring) of one layer: output groups `outs`, input `ins`."""
    rows = []
    for go in outs:
        cols = []
        for gi in ins:
            both = [m for m in go.models if m in gi.models]
            block = torch.zeros(len(go.index), len(gi.index), dtype=w[0].dtype)
            for m in both:
                block = block + w[m][go.index][:, gi.index]
            cols.append(block / len(go.models))
        rows.append(torch.cat(cols, 1))
    return torch.cat(rows, 0), None if b is None else _gather(b, outs, 0)


def _solve_layer(
    z: Tensor,
    target: Tensor,
    w_init: Tensor,
    b_init: Tensor | None,
    outs: list[_Group],
    ins: list[_Group],
    ridge: float,
) -> tuple[Tensor, Tensor | None]:
    """Closed-form ridge-to-init least squares per output group over its allowed inputs."""
    z = z.to(torch.float64)
    target = target.to(torch.float64)
    w = w_init.to(torch.float64).clone()
    b = None if b_init is None else b_init.to(torch.float64).clone()
    starts, s = [], 0
    for g in ins:
        starts.append(s)
        s += len(g.index)
    row = 0
    for go in outs:
        cols = torch.cat(
            [
                torch.arange(starts[k], starts[k] + len(gi.index))
                for k, gi in enumerate(ins)
                if set(go.models) & set(gi.models)
            ]
        )
        rows = slice(row, row + len(go.index))
        row += len(go.index)
        feats = z[:, cols]
        init = w[rows][:, cols]
        if b is not None:
            feats = torch.cat([feats, torch.ones(len(z), 1, dtype=torch.float64)], 1)
            init = torch.cat([init, b[rows][:, None]], 1)
        gram = feats.T @ feats
        lam = ridge * float(gram.diagonal().mean())
        eye = torch.eye(len(gram), dtype=torch.float64)
        rhs = feats.T @ target[:, rows] + lam * init.T
        solution = torch.linalg.solve(gram + lam * eye, rhs).T
        w[rows.start : rows.stop, cols] = solution[:, : len(cols)]
        if b is not None:
            b[rows] = solution[:, -1]
    return w.to(w_init.dtype), None if b is None or b_init is None else b.to(b_init.dtype)


def pleas_merge(
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    inputs: Tensor,
    *,
    merge_fraction: float = 0.5,
    least_squares: bool = True,
    activation: Callable[[Tensor], Tensor] = torch.relu,
    ridge: float = 1e-3,
    max_iter: int = 100,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Merge two MLP chains by PLeaS (module docstring): a state dict with the same names,
    hidden widths m + 2(n − m). ``least_squares=False`` returns the partial-matching
    initialization (step 3) only."""
    if not 0.0 <= merge_fraction <= 1.0:
        raise AlignmentError(f"merge_fraction must be in [0, 1], got {merge_fraction}")
    if ridge < 0:
        raise AlignmentError(f"ridge must be >= 0, got {ridge}")
    shapes = {k: tuple(v.shape) for k, v in state_a.items()}
    layers = linear_chain(shapes)
    spec = mlp_spec(shapes)
    if inputs.ndim != 2 or inputs.shape[1] != shapes[layers[0] + ".weight"][1]:
        raise AlignmentError(
            f"inputs {list(inputs.shape)} are not a batch of "
            f"{shapes[layers[0] + '.weight'][1]}-feature rows"
        )
    if not inputs.is_floating_point() or not bool(torch.isfinite(inputs).all()):
        raise AlignmentError("inputs must be finite floating-point values")
    match = weight_matching(spec, state_a, state_b, max_iter=max_iter, seed=seed)
    b_aligned = apply_permutation(spec, match.perms, state_b)
    identity = {p: torch.arange(len(v)) for p, v in match.perms.items()}
    widths: list[list[_Group]] = [_groups(shapes[layers[0] + ".weight"][1], None)]
    for k in range(len(layers) - 1):
        p = f"P_{k}"
        cost = cost_matrix(spec, state_a, b_aligned, identity, p, len(identity[p]))
        merged = _merged_units(cost, identity[p], merge_fraction)
        widths.append(_groups(len(identity[p]), merged))
    widths.append(_groups(shapes[layers[-1] + ".weight"][0], None))

    out: dict[str, Tensor] = {}
    x = [inputs, inputs]  # the original models' inputs to the current layer
    for k, layer in enumerate(layers):
        w = [state_a[layer + ".weight"], b_aligned[layer + ".weight"]]
        has_bias = layer + ".bias" in state_a
        bias = [state_a[layer + ".bias"], b_aligned[layer + ".bias"]] if has_bias else None
        w_init, b_init = _init_layer(w, bias, widths[k + 1], widths[k])
        with torch.no_grad():
            y = [
                F.linear(x[m].to(w[m].dtype), w[m], None if bias is None else bias[m])
                for m in (0, 1)
            ]
            if least_squares:
                z = _gather(x, widths[k], 1)
                target = _gather(y, widths[k + 1], 1)
                w_init, b_init = _solve_layer(
                    z, target, w_init, b_init, widths[k + 1], widths[k], ridge
                )
            x = [activation(t) for t in y]
        out[layer + ".weight"] = w_init
        if b_init is not None:
            out[layer + ".bias"] = b_init
    return out
