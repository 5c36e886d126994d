"""AdaMerging (Yang et al., ICLR 2024, "AdaMerging: Adaptive Model Merging for Multi-Task
Learning"): merging coefficients learned by entropy minimization on unlabeled test inputs.

With the base θ0 and the task vectors τ_k = θ_k − θ0 of K experts,

    task-wise:   θ(λ)   = θ0   + Σ_k λ_k τ_k                 λ ∈ R^K
    layer-wise:  θ^l(λ) = θ0^l + Σ_k λ_k^l τ_k^l             λ ∈ R^{K x L}, l = one tensor

and λ minimizes the summed Shannon entropy of the merged model's predictions on each
task's unlabeled batches, each through that task's own head (heads are not merged):

    min_λ  Σ_k Σ_{b in step's batches of task k}  mean_{x in b} H(softmax(f_k(x; θ(λ))))
    H(p) = −Σ_c p_c log p_c

AdaMerging++ is the same on the TIES-processed task vectors (``ties_density``): each τ_k
trimmed to its top-k magnitudes over the whole model, a sign elected per entry from the
trimmed vectors' sum, and the entries that disagree with it dropped (`ties_task_vectors`;
the trim and the election are splice's TIES code: `splice.engine.topk.keep_rules`,
`magnitude_trim_` and `elect_signs` of `splice.merge.methods._common`).

Choices, from the paper's released code (EnnengYang/AdaMerging, ``main_*_adamerging*.py``),
checked against FusionBench (tanganke/fusion_bench, ``method/adamerging``):
- init λ = 0.3 everywhere (the code's ``prior``; FusionBench's ``init_values``); the base
  keeps coefficient 1.
- clamp: the coefficients used are clamp(λ_raw, 0, 1) while Adam updates the unclamped
  λ_raw (the paper's ``lambdas()``); ``clamp=None`` uses λ_raw as is (FusionBench's configs
  set ``clamp_weights: false``). The returned coefficients are the ones used.
- optimizer: Adam, lr 1e-3, betas (0.9, 0.999), no weight decay; ``steps`` = 500 (the
  paper; FusionBench 1000). One step: for every task, ``batches_per_step`` batches (the
  paper takes two batches of 16 per task per step, ``if i > 0: break``; FusionBench one),
  the mean entropy of each batch summed over batches and tasks, one Adam step.
- a "layer" is one floating tensor of the state (weight and bias separately): the paper
  gives every parameter tensor its own λ column, as FusionBench (one per trainable
  parameter). Non-floating tensors (integer buffers) are copied from the base.
- entropy: the paper's −Σ softmax · log_softmax (FusionBench adds 1e-8 inside the log).
- AdaMerging++: the paper's ``K = 20`` (keep the top 20% of each task vector, over all its
  tensors) and ``dis-sum`` (the kept entries that agree with the elected sign). Deviations:
  splice keeps exactly round(density · N) entries (the paper's ``kthvalue`` mask keeps
  int(density · N) + 1 and every tie); where Σ_k of the trimmed entries is exactly 0 the
  paper takes the sign of the overall sum, splice's TIES elects +1.
- batches: the caller's batches are kept as given; each task's list is visited in a seeded
  random order, reshuffled after each pass (the paper rebuilds a shuffled loader every step,
  which also regroups the examples).

``forward(params, task, batch)`` computes task ``task``'s logits (``[batch, classes]``) of
the model whose floating tensors are ``params`` (name -> tensor, the differentiable merged
state), typically ``torch.func.functional_call(model, {**params, **head_k}, kwargs=batch)``
with the model in eval mode; it must not detach.

Gradient: each batch's loss is back-propagated on its own (FusionBench's order) down to the
merged tensors θ(λ) only, held as leaves of the step, where the gradients G = Σ_batches
∂loss/∂θ add up; ∂loss/∂λ_k^l = ⟨G^l, τ_k^l⟩ is then taken once per step (and through the
clamp). The same gradient as back-propagating every batch through θ0 + Σ_k λ_k τ_k (linear
in the batches' gradients; equal up to float summation order), without K reductions over
the whole model per batch, and without the K copies of the model the merge graph held. The
merged tensors are made in place, without a graph (`_merged`). 8 MiniLM-L6 experts,
layer-wise, batches of 16 x 48 tokens, 6 steps on 2 CPU cores (the set-up included):
25.8-26.2 -> 18.6-19.6 s, peak RSS 3.10-3.16 -> 2.59-2.63 GB.
Memory: the base and the K task vectors in float32 (K + 1 copies of the merged tensors), one
merged copy per step and its gradient, and one batch's activations. Time per step:
K · batches_per_step forward and backward passes of the model, plus K multiply-adds of the
state to merge and K dot products over it for ∂loss/∂λ.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from splice.errors import DataError, MergeValidationError

Granularity = Literal["task", "layer"]
ForwardFn = Callable[[Mapping[str, Tensor], int, Any], Tensor]
State = Mapping[str, Tensor]

PAPER_INIT = 0.3
PAPER_LR = 1e-3
PAPER_STEPS = 500
PAPER_BATCHES_PER_STEP = 2
PAPER_TIES_DENSITY = 0.2


@dataclass(frozen=True)
class AdaMergingResult:
    """The merged state and what was learned.

    ``coefficients``: the λ used for ``state`` (after clamping): shape [K] task-wise,
    [K, L] layer-wise with column j for ``layers[j]``. ``losses``: the summed entropy of
    each step (before its update). ``seconds``: wall time of the coefficient training.
    """

    state: dict[str, Tensor]
    coefficients: Tensor
    layers: tuple[str, ...]
    losses: tuple[float, ...]
    seconds: float


def entropy(logits: Tensor) -> Tensor:
    """Mean over the rows of the Shannon entropy of softmax(row): −Σ_c p_c log p_c."""
    logits = logits.float()
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()


def task_vectors(base: State, experts: Sequence[State], names: Sequence[str]) -> list[dict]:
    """τ_k = θ_k − θ0 for each expert, float32, over ``names``."""
    return [{n: e[n].detach().float() - base[n].detach().float() for n in names} for e in experts]


def ties_task_vectors(
    vectors: Sequence[Mapping[str, Tensor]], density: float = PAPER_TIES_DENSITY
) -> list[dict[str, Tensor]]:
    """The TIES-processed task vectors of AdaMerging++ (new tensors; inputs untouched).

    Each τ_k keeps its round(density · N) largest-magnitude entries over all its tensors
    (N entries in all; TIES's whole-model trim), then per entry the sign s = sign⁺(Σ_k τ̂_k)
    is elected and τ̂_k keeps only the entries whose sign is s: Σ_k of the result is TIES
    with disjoint "sum".
    """
    from splice.engine.topk import keep_rules
    from splice.merge import MergeContext, TopKThreshold
    from splice.merge.methods._common import elect_signs, magnitude_trim_

    if not 0 < density <= 1:
        raise MergeValidationError(f"ties density must be in (0, 1], got {density}")
    names = list(vectors[0])
    trimmed = [{n: v[n].detach().float().clone() for n in names} for v in vectors]
    requests = [TopKThreshold(k, density) for k in range(len(vectors))]
    rules = keep_rules(
        requests,
        range(len(names)),
        numel=lambda j: trimmed[0][names[j]].numel(),
        magnitudes=lambda j: [v[names[j]].abs() for v in trimmed],
    )
    for j, name in enumerate(names):
        ctx = MergeContext(tensor_name=name, model_stats=rules[j])
        for k, v in enumerate(trimmed):
            magnitude_trim_(v[name], density, k, scope="model", ctx=ctx, rescale=False)
        sign = elect_signs([v[name] for v in trimmed], "sum")
        for v in trimmed:
            v[name].mul_(sign).clamp_(min=0).mul_(sign)  # keep the entries of sign s
    return trimmed


def adamerging(
    base: State,
    experts: Sequence[State],
    batches: Sequence[Sequence[Any]],
    forward: ForwardFn,
    *,
    granularity: Granularity = "layer",
    init: float = PAPER_INIT,
    clamp: tuple[float, float] | None = (0.0, 1.0),
    lr: float = PAPER_LR,
    steps: int = PAPER_STEPS,
    batches_per_step: int = PAPER_BATCHES_PER_STEP,
    ties_density: float | None = None,
    optimizer: Literal["adam", "sgd"] = "adam",
    seed: int = 0,
    progress: bool = False,
) -> AdaMergingResult:
    """Learn AdaMerging coefficients (see the module docstring) and return the merged state.

    ``batches[k]``: task k's unlabeled batches (any objects ``forward`` takes), one list per
    expert, in the experts' order. ``ties_density``: AdaMerging++ with that TIES density
    (the paper: 0.2). ``optimizer="sgd"``: plain gradient descent λ ← λ − lr · ∇ (not the
    paper's; for checks by hand). ``seed`` fixes the order in which batches are drawn.
    """
    _check_settings(granularity, init, clamp, lr, steps, batches_per_step, ties_density)
    names = _check_states(base, experts)
    _check_batches(batches, len(experts))
    start = time.perf_counter()
    vectors = task_vectors(base, experts, names)
    if ties_density is not None:
        vectors = ties_task_vectors(vectors, ties_density)
    theta0 = {n: base[n].detach().float() for n in names}
    # tensors no expert changes (a LoRA expert's: all but its target modules) get no
    # gradient: ⟨G^l, τ_k^l⟩ = 0 for every k, so their λ never move and their backward
    # work is skipped (the step then costs what a LoRA expert's training step does)
    moving = {n for n in names if any(bool(v[n].any()) for v in vectors)}
    shape = (len(experts),) if granularity == "task" else (len(experts), len(names))
    raw = torch.nn.Parameter(torch.full(shape, float(init)))
    opt: torch.optim.Optimizer
    if optimizer == "adam":
        opt = torch.optim.Adam([raw], lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    else:
        opt = torch.optim.SGD([raw], lr=lr)
    draw = _BatchDraw(batches, seed)
    losses: list[float] = []
    from tqdm.auto import tqdm

    for _ in tqdm(range(steps), desc="adamerging", disable=not progress, leave=False):
        opt.zero_grad(set_to_none=True)
        lam = _used(raw, clamp)
        # the merged weights as leaves: every batch's backward stops at them and their
        # gradients add up; the step's gradient to λ is then taken once (`_lambda_grad`)
        params = _merged(theta0, vectors, lam, granularity, moving)
        for n in moving:
            params[n].requires_grad_(True)
        total = 0.0
        for k in range(len(experts)):
            for _b in range(batches_per_step):
                logits = forward(params, k, draw.next(k))
                if logits.dim() != 2 or logits.shape[0] == 0:
                    raise MergeValidationError(
                        f"forward must return logits of shape [batch, classes], got "
                        f"{tuple(logits.shape)} for task {k}"
                    )
                loss = entropy(logits)
                if not bool(torch.isfinite(loss)):
                    raise DataError(f"the entropy of task {k}'s predictions is not finite")
                loss.backward()
                total += float(loss.detach())
        losses.append(total)
        lam.backward(_lambda_grad(params, vectors, lam.shape, granularity))
        opt.step()
    used = _used(raw, clamp).detach().clone()
    merged = _merged(theta0, vectors, used, granularity, moving)
    state = {n: t.clone() for n, t in base.items()}  # θ0 where no expert moved it
    for n in moving:
        state[n] = merged[n].to(base[n].dtype)
    return AdaMergingResult(state, used, tuple(names), tuple(losses), time.perf_counter() - start)


def _used(raw: Tensor, clamp: tuple[float, float] | None) -> Tensor:
    return raw if clamp is None else raw.clamp(clamp[0], clamp[1])


def _merged(
    theta0: Mapping[str, Tensor],
    vectors: Sequence[Mapping[str, Tensor]],
    lam: Tensor,
    granularity: Granularity,
    moving: Collection[str],
) -> dict[str, Tensor]:
    """θ0 + Σ_k λ_k τ_k per tensor (λ_k^l for tensor l layer-wise), without a graph: each
    tensor one copy of θ0 with the K terms added in place (``add_(τ, alpha=λ)``), not K
    fresh sums a tensor (fresh pages each). A tensor not in ``moving`` (every τ_k^l = 0) is
    θ0's own tensor, not a copy: nothing writes to it."""
    coefficients = lam.detach().tolist()
    out = {}
    for j, name in enumerate(theta0):
        if name not in moving:
            out[name] = theta0[name]
            continue
        t = theta0[name].clone()
        for k, v in enumerate(vectors):
            t.add_(v[name], alpha=coefficients[k] if granularity == "task" else coefficients[k][j])
        out[name] = t
    return out


def _lambda_grad(
    params: Mapping[str, Tensor],
    vectors: Sequence[Mapping[str, Tensor]],
    shape: torch.Size,
    granularity: Granularity,
) -> Tensor:
    """∂loss/∂λ from the gradients G^l accumulated on the merged tensors θ^l(λ) = θ0^l +
    Σ_k λ_k^l τ_k^l: ∂loss/∂λ_k^l = ⟨G^l, τ_k^l⟩ layer-wise, summed over l task-wise. (A
    tensor the forward did not use has no gradient: 0.)"""
    grad = torch.zeros(shape)
    for j, (name, g) in enumerate(params.items()):
        if g.grad is None:
            continue
        flat = g.grad.reshape(-1)
        for k, v in enumerate(vectors):
            dot = torch.dot(flat, v[name].reshape(-1))
            if granularity == "task":
                grad[k] += dot
            else:
                grad[k, j] = dot
    return grad


class _BatchDraw:
    """Each task's batches in a seeded random order, reshuffled after each pass."""

    def __init__(self, batches: Sequence[Sequence[Any]], seed: int):
        self.batches = batches
        self.gen = torch.Generator().manual_seed(seed)
        self.order: list[list[int]] = [[] for _ in batches]

    def next(self, task: int) -> Any:
        if not self.order[task]:
            self.order[task] = torch.randperm(len(self.batches[task]), generator=self.gen).tolist()
        return self.batches[task][self.order[task].pop(0)]


def _check_settings(
    granularity: str,
    init: float,
    clamp: tuple[float, float] | None,
    lr: float,
    steps: int,
    batches_per_step: int,
    ties_density: float | None,
) -> None:
    if granularity not in ("task", "layer"):
        raise MergeValidationError(f"granularity must be 'task' or 'layer', not {granularity!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise MergeValidationError(f"steps must be a positive integer, got {steps!r}")
    if isinstance(batches_per_step, bool) or not isinstance(batches_per_step, int):
        raise MergeValidationError(f"batches_per_step must be an integer, got {batches_per_step!r}")
    if batches_per_step <= 0:
        raise MergeValidationError(f"batches_per_step must be positive, got {batches_per_step}")
    if not (math.isfinite(lr) and lr > 0):
        raise MergeValidationError(f"lr must be a positive finite number, got {lr}")
    if not math.isfinite(init):
        raise MergeValidationError(f"init must be finite, got {init}")
    if clamp is not None and not (
        len(clamp) == 2 and all(math.isfinite(c) for c in clamp) and clamp[0] <= clamp[1]
    ):
        raise MergeValidationError(f"clamp must be (low, high) with low <= high, got {clamp}")
    if ties_density is not None and not 0 < ties_density <= 1:
        raise MergeValidationError(f"ties_density must be in (0, 1], got {ties_density}")


def _check_states(base: State, experts: Sequence[State]) -> list[str]:
    """The floating tensors of the base, each present with its shape in every expert."""
    if not experts:
        raise MergeValidationError("AdaMerging needs at least one expert")
    names = [n for n, t in base.items() if t.is_floating_point()]
    if not names:
        raise MergeValidationError("the base state has no floating tensors to merge")
    for k, e in enumerate(experts):
        for n in names:
            if n not in e:
                raise MergeValidationError(f"expert {k} has no tensor '{n}' (the base has)")
            if tuple(e[n].shape) != tuple(base[n].shape):
                raise MergeValidationError(
                    f"tensor '{n}': expert {k} has shape {tuple(e[n].shape)}, the base "
                    f"{tuple(base[n].shape)}"
                )
    return names


def _check_batches(batches: Sequence[Sequence[Any]], n_experts: int) -> None:
    if len(batches) != n_experts:
        raise DataError(
            f"AdaMerging needs unlabeled batches for every task: {len(batches)} batch lists "
            f"for {n_experts} experts"
        )
    for k, task_batches in enumerate(batches):
        if len(task_batches) == 0:
            raise DataError(f"task {k} has no unlabeled batches (AdaMerging needs data)")
        for i, b in enumerate(task_batches):
            if _rows(b) == 0:
                raise DataError(f"task {k}: batch {i} is empty")


def _rows(batch: Any) -> int | None:
    """The number of examples of a batch: a tensor's first axis, a mapping's first tensor
    (or list) value's, a list's length; None when unknown."""
    if isinstance(batch, Tensor):
        return batch.shape[0] if batch.dim() else None
    if isinstance(batch, Mapping):
        for v in batch.values():
            if isinstance(v, Tensor) and v.dim():
                return v.shape[0]
            if isinstance(v, (list, tuple)):
                return len(v)
        return 0 if not batch else None
    if isinstance(batch, (list, tuple)):
        return len(batch)
    return None
