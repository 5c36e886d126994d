"""FW-Merging (Chen et al. 2025, "FW-Merging: Scaling Model Merging with Frank-Wolfe
Optimization"): Frank-Wolfe over the convex hull of a pool of fine-tuned checkpoints, the
linear minimization oracle choosing, at every step, the checkpoint the objective's gradient
points to.

Objective: L(θ) = (1/K) Σ_k L_k(θ), one loss per task (``objectives``: callables taking the
model, whose parameters hold θ, and returning a scalar; e.g. the cross-entropy of a few
labelled batches). Each iteration t = 0, 1, ...:

1. Relevance (gradient): g = ∇L(θ_t) (hard) or g_k = ∇L_k(θ_t) per task (soft).
2. Linear minimization oracle over the pool P = {θ_1, ..., θ_n} (hard: plus the starting
   point θ_0, as the authors' code adds its "initial" model):

       oracle "cosine" (default, the authors' code):  s = argmin_m Σ_p cos(g_p, θ_m,p)
       oracle "inner" (textbook Frank-Wolfe):          s = argmin_m Σ_p ⟨g_p, θ_m,p − θ_t,p⟩

   p runs over the merged tensors; cos(g, θ) = ⟨g, θ⟩ / (‖g‖ ‖θ‖), taken as 0 where a norm
   is 0. ``granularity="model"`` picks one checkpoint for all tensors (the sum over p);
   ``"tensor"`` picks per tensor (the authors' "layer" granularity).
3. Step, γ_t = ``step_size`` · 2 / (t + 2):

       hard:  θ_{t+1} = θ_t + λ γ_t (s − θ_t)                        λ = ``scaling`` (1)
       soft:  θ_{t+1} = θ_t + c γ'_t Σ_{k} (s_k − θ_t),  γ'_0 = 1, γ'_t = γ_t (t > 0)

   In the soft variant each task k picks its own s_k, a checkpoint not yet picked by an
   earlier task in the same iteration, and the picks are combined with one coefficient
   c = ``soft_scaling`` (0.3, the authors' code's constant). The authors' default FW-Soft
   instead learns layer-wise coefficients for the picks by AdaMerging at every iteration;
   that inner optimisation is not done here (the fixed-coefficient branch of their code).

Start θ_0: the base model (``init="base"``, the authors' FW-Soft start) or task arithmetic
over the whole pool, θ_0 = base + ``init_scaling`` Σ_m (θ_m − base) (``"task_arithmetic"``,
their FW-Hard start, whose default scaling is 1.0). With λ = ``step_size`` = 1 the first hard
step lands on the first pick (γ_0 = 1).

Why it scales to pools with irrelevant models: a checkpoint only enters θ when the oracle
picks it, i.e. when it points down the objective's gradient; an irrelevant one is never
picked (a test checks this on a constructed pool).

Merged tensors: the floating parameters of ``model`` present in ``base`` and every pool
entry (``names`` restricts them); other tensors are the base's. Memory: the pool and base
state dicts, θ_t, one gradient per merged tensor and the model's autograd graph for one
objective. Time: per iteration one forward + backward of every objective (hard and soft
alike) and one pass over the pool.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from splice.errors import MergeValidationError

Objective = Callable[[nn.Module], Tensor]


@dataclass
class FWResult:
    state_dict: dict[str, Tensor]
    # per iteration: the picked pool index per task (soft) or the one pick (hard, a list of
    # one); "tensor" granularity records the pick of the first merged tensor. Index n is
    # the starting point θ_0 (hard only).
    picks: list[list[int]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # L(θ_t) before each step


def fw_merge(
    model: nn.Module,
    base: Mapping[str, Tensor],
    pool: Sequence[Mapping[str, Tensor]],
    objectives: Sequence[Objective],
    *,
    variant: Literal["hard", "soft"] = "hard",
    iterations: int = 10,
    step_size: float = 1.0,
    scaling: float = 1.0,
    soft_scaling: float = 0.3,
    granularity: Literal["model", "tensor"] = "model",
    oracle: Literal["cosine", "inner"] = "cosine",
    init: Literal["base", "task_arithmetic"] = "base",
    init_scaling: float = 1.0,
    names: Sequence[str] | None = None,
) -> FWResult:
    """Merge ``pool`` (state dicts fine-tuned from ``base``) by Frank-Wolfe on the mean of
    ``objectives``; ``model`` is the architecture (not modified: a copy is used)."""
    _check(variant, granularity, oracle, init, iterations, pool, objectives)
    for label, v in (
        ("step_size", step_size),
        ("scaling", scaling),
        ("soft_scaling", soft_scaling),
    ):
        if not (v > 0 and v < float("inf")):
            raise MergeValidationError(f"{label} = {v} must be a positive finite number")
    work = copy.deepcopy(model).float()
    params = dict(work.named_parameters())
    chosen = (
        list(names)
        if names is not None
        else [n for n, p in params.items() if p.is_floating_point() and n in base]
    )
    for n in chosen:
        if n not in params:
            raise MergeValidationError(f"'{n}' is not a parameter of the model")
        for i, sd in enumerate([base, *pool]):
            if n not in sd or tuple(sd[n].shape) != tuple(params[n].shape):
                who = "base" if i == 0 else f"pool[{i - 1}]"
                raise MergeValidationError(f"{who} lacks '{n}' or has another shape")
    if not chosen:
        raise MergeValidationError("no tensors to merge (the model and base share none)")
    vertices = [{n: sd[n].detach().float() for n in chosen} for sd in pool]
    theta = {n: base[n].detach().float().clone() for n in chosen}
    if init == "task_arithmetic":
        for n in chosen:
            theta[n] += init_scaling * sum(v[n] - theta[n] for v in vertices)
    if variant == "hard":
        vertices.append({n: t.clone() for n, t in theta.items()})  # the starting point
    for p in params.values():
        p.requires_grad_(False)
    for n in chosen:
        params[n].requires_grad_(True)
    result = FWResult({})
    was_training = work.training
    work.eval()
    for t in range(iterations):
        gamma = step_size * 2 / (t + 2)
        _load(params, theta)
        if variant == "hard":
            grad, loss = _gradient(work, params, chosen, objectives)
            result.losses.append(loss)
            pick = _oracle(grad, theta, vertices, chosen, oracle, granularity, excluded={})
            result.picks.append([pick[chosen[0]]])
            step = scaling * gamma
            for n in chosen:
                theta[n] += step * (vertices[pick[n]][n] - theta[n])
        else:
            picks: list[dict[str, int]] = []
            total = 0.0
            for objective in objectives:
                grad, loss = _gradient(work, params, chosen, [objective])
                total += loss / len(objectives)
                taken = {n: {p[n] for p in picks} for n in chosen}  # one pick per checkpoint
                picks.append(_oracle(grad, theta, vertices, chosen, oracle, granularity, taken))
                if len(picks) == len(vertices):
                    break
            result.losses.append(total)
            result.picks.append([p[chosen[0]] for p in picks])
            step = soft_scaling * (1.0 if t == 0 else gamma)
            update = {n: sum(vertices[p[n]][n] - theta[n] for p in picks) for n in chosen}
            for n in chosen:
                theta[n] += step * update[n]
    work.train(was_training)
    out = {n: t.detach().clone() for n, t in base.items()}
    for n in chosen:
        out[n] = theta[n].to(base[n].dtype)
    result.state_dict = out
    return result


def _check(variant, granularity, oracle, init, iterations, pool, objectives) -> None:
    for label, value, allowed in (
        ("variant", variant, ("hard", "soft")),
        ("granularity", granularity, ("model", "tensor")),
        ("oracle", oracle, ("cosine", "inner")),
        ("init", init, ("base", "task_arithmetic")),
    ):
        if value not in allowed:
            raise MergeValidationError(f"{label} must be one of {list(allowed)}, not {value!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise MergeValidationError(f"iterations = {iterations!r} must be an integer >= 1")
    if not pool:
        raise MergeValidationError("FW-Merging needs a non-empty pool of checkpoints")
    if not objectives:
        raise MergeValidationError("FW-Merging needs at least one objective (a task's loss)")


def _load(params: dict[str, nn.Parameter], theta: dict[str, Tensor]) -> None:
    with torch.no_grad():
        for n, t in theta.items():
            params[n].copy_(t)


def _gradient(
    work: nn.Module,
    params: dict[str, nn.Parameter],
    chosen: list[str],
    objectives: Sequence[Objective],
) -> tuple[dict[str, Tensor], float]:
    """∇ of the mean of ``objectives`` at the loaded θ (zeros for unused tensors)."""
    total = None
    for objective in objectives:
        loss = objective(work)
        if loss.dim() != 0:
            raise MergeValidationError(
                f"an objective must return a scalar, got {tuple(loss.shape)}"
            )
        if not bool(torch.isfinite(loss)):
            raise MergeValidationError("an objective returned a non-finite loss")
        total = loss if total is None else total + loss
    assert total is not None
    total = total / len(objectives)
    grads = torch.autograd.grad(total, [params[n] for n in chosen], allow_unused=True)
    out = {
        n: (torch.zeros_like(params[n]) if g is None else g.detach())
        for n, g in zip(chosen, grads, strict=True)
    }
    return out, float(total.detach())


def _oracle(
    grad: dict[str, Tensor],
    theta: dict[str, Tensor],
    vertices: list[dict[str, Tensor]],
    chosen: list[str],
    oracle: str,
    granularity: str,
    excluded: dict[str, set[int]],
) -> dict[str, int]:
    """The picked vertex index per tensor (the same index for all under "model")."""
    scores = torch.zeros(len(vertices), len(chosen), dtype=torch.float64)
    for m, v in enumerate(vertices):
        for j, n in enumerate(chosen):
            g = grad[n].double().flatten()
            x = v[n].double().flatten()
            if oracle == "inner":
                scores[m, j] = g @ (x - theta[n].double().flatten())
            else:
                norms = g.norm() * x.norm()
                scores[m, j] = 0.0 if norms == 0 else (g @ x) / norms
    for j, n in enumerate(chosen):
        for m in excluded.get(n, ()):
            scores[m, j] = float("inf")
    if granularity == "model":
        best = int(torch.argmin(scores.sum(dim=1)))  # first index on ties
        return dict.fromkeys(chosen, best)
    return {n: int(torch.argmin(scores[:, j])) for j, n in enumerate(chosen)}
