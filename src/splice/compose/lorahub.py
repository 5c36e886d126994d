"""LoraHub (Huang et al. 2023): gradient-free composition of N LoRA experts on a few examples.

    result = lorahub(model, ["lora_a", "lora_b", "lora_c"], batches, "out/", budget=40, seed=0)
    result.weights          # [w_1, ..., w_N]; out/ is a PEFT LoRA folder of the composition

The composition (the official code's ``get_score`` / ``get_final_weights``, sail-sg/lorahub):
every saved LoRA tensor is the weighted sum of the experts' tensors, so per module

    A = Σ_i w_i A_i,      B = Σ_i w_i B_i,      ΔW = s · B A = s · (Σ_i w_i B_i)(Σ_j w_j A_j).

This is a sum of the *factors*, not of the updates: ΔW holds the cross terms w_i w_j B_i A_j
(i ≠ j) and is even in w (w and −w give the same ΔW). It needs the same rank for a module
in every expert. The official code sums the stored tensors and lets PEFT apply the first
expert's scale s = alpha / r to the sum; splice folds each expert's own scale into its B
first (B = Σ w_i s_i B_i, written with scale 1), which is the same when the experts share
their scale (LoraHub's setting) and still defined when they do not.

The weights minimise, over the box [−1.5, 1.5]^N, starting from w = 0 (the base model),

    objective(w) = loss(w) + α · (1/N) Σ_i |w_i|,      α = 0.05,

the official ``default_l1_regularization`` (0.05 times the mean absolute weight). loss(w)
here is the mean cross-entropy per target token over all the examples (a causal LM: the
prompt tokens carry label −100; a classifier: the mean over examples). The official
``default_get_loss`` instead adds each batch's mean loss and divides by the number of
examples; with its default of one batch that is the token mean divided by the number of
examples, which weakens the loss against the L1 term as examples are added.

Search: the official code runs nevergrad's ``NGOpt`` (a meta-optimiser that picks an
algorithm from the dimension and budget; the paper describes CMA-ES) with budget
``max_inference_step`` = 40. splice runs CMA-ES itself through the `cma` package
(`splice.engine.cma_search`): the same box, start at 0, σ0 = 0.5 (a sixth of the box),
its default population, seeded, ``budget`` objective evaluations (default 40), and returns
the best weights evaluated. Each evaluation loads the composed factors into one LoRA adapter
of an `AdapterModel` (no re-reading of files) and runs the examples once, without gradients.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from splice.adapters import AdapterModel
from splice.adapters.registry import method_for_peft_type
from splice.delta import LowRank
from splice.engine.cma_search import SearchResult, cma_minimize
from splice.errors import MergeValidationError, SpliceError
from splice.io.output_folder import OutputFolder
from splice.peft import read_lora_adapters, write_adapter_files
from splice.peft.files import saved_key
from splice.peft.lora_reader import LoadedAdapter
from splice.peft.lora_writer import adapter_config, adapter_tensors

DEFAULT_BUDGET = 40  # the official max_inference_step
DEFAULT_L1 = 0.05  # the official default_l1_regularization coefficient
DEFAULT_BOUNDS = (-1.5, 1.5)  # the official nevergrad Array bounds
SEARCH_ADAPTER = "lorahub_search"

Batch = dict[str, Tensor]
# (model, batch) -> (summed loss, number of loss terms)
LossFn = Callable[[nn.Module, Batch], tuple[Tensor, int]]


class LoraHubError(SpliceError):
    pass


def compose_factors(factors: Sequence[LowRank], weights: Sequence[float]) -> LowRank:
    """LoraHub's composed factors of one module: A = Σ w_i A_i, B = Σ w_i s_i B_i, scale 1
    (each expert's scale s_i folded into its B; see the module docstring)."""
    if len(factors) != len(weights):
        raise LoraHubError(f"{len(weights)} weight(s) for {len(factors)} adapter(s)")
    a = sum(float(w) * f.a for w, f in zip(weights, factors, strict=True))
    b = sum(float(w) * f.scaling * f.b for w, f in zip(weights, factors, strict=True))
    assert isinstance(a, Tensor) and isinstance(b, Tensor)
    return LowRank(b, a, 1.0)


@dataclass
class LoraExperts:
    """N LoRA adapter folders of one base, loaded as factors and checked for LoraHub."""

    adapters: list[LoadedAdapter]

    @classmethod
    def load(cls, adapter_dirs: Sequence[str | os.PathLike[str]]) -> LoraExperts:
        """Read and cross-check (same modules and shapes: `read_lora_adapters`; same rank
        per module, which summing factors needs)."""
        if not adapter_dirs:
            raise LoraHubError("LoraHub needs at least one LoRA adapter")
        adapters = read_lora_adapters([Path(d) for d in adapter_dirs])
        first = adapters[0]
        for other in adapters[1:]:
            for module, f in first.modules.items():
                g = other.modules[module]
                if g.rank != f.rank:
                    raise MergeValidationError(
                        f"{other.path}: module '{module}' has rank {g.rank}, {first.path} has "
                        f"{f.rank}; LoraHub sums the factors and needs equal ranks"
                    )
        return cls(adapters)

    @property
    def paths(self) -> list[Path]:
        return [a.path for a in self.adapters]

    def compose(self, weights: Sequence[float]) -> dict[str, LowRank]:
        """The composed factors of every module."""
        return {
            m: compose_factors([a.modules[m] for a in self.adapters], weights)
            for m in sorted(self.adapters[0].modules)
        }

    def config(self) -> dict[str, Any]:
        """The composed adapter's PEFT config (the first expert's, scale 1: alpha = r)."""
        first = self.adapters[0]
        ranks = {m: f.rank for m, f in first.modules.items()}
        return adapter_config(first.raw_config, ranks)

    def write(
        self,
        weights: Sequence[float],
        folder: Path,
        *,
        info: dict[str, Any] | None = None,
        allow_nonfinite: bool = False,
    ) -> None:
        """Write the composition with ``weights`` into ``folder`` (an `OutputFolder`'s partial
        folder) with splice's one PEFT LoRA writer; ``info`` goes into the weights' metadata."""
        first = self.adapters[0]
        write_adapter_files(
            folder,
            self.compose(weights),
            first.embedding,
            first.raw_config,
            metadata={"splice_lorahub": json.dumps(info or {})},
            allow_nonfinite=allow_nonfinite,
        )


def example_loss(model: nn.Module, batch: Batch) -> tuple[Tensor, int]:
    """(summed cross-entropy, number of terms) of one batch. Logits of shape (B, T, V): a
    causal LM, position t predicts labels[t + 1] (labels −100 ignored); logits (B, C): a
    classifier, one term per example."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits.float()
    labels = batch["labels"]
    if logits.dim() == 3:
        logits, labels = logits[:, :-1], labels[:, 1:]
    flat, targets = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    loss = nn.functional.cross_entropy(flat, targets, ignore_index=-100, reduction="sum")
    return loss, int((targets != -100).sum())


@dataclass
class LoraHubResult:
    weights: list[float]
    objective: float  # loss + L1 term at the weights
    loss: float  # the examples' mean loss at the weights
    base_loss: float  # at w = 0 (the base model)
    adapters: list[str]
    evaluations: int
    history: list[tuple[list[float], float]] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "weights": dict(zip(self.adapters, self.weights, strict=True)),
            "objective": self.objective,
            "loss": self.loss,
            "base_loss": self.base_loss,
            "evaluations": self.evaluations,
        }


class LoraHubObjective:
    """objective(w) = mean loss of ``batches`` with the composed adapter + l1 · mean |w|,
    evaluated on a LoRA adapter ``SEARCH_ADAPTER`` added to ``am`` (`remove` takes it out)."""

    def __init__(
        self,
        am: AdapterModel,
        experts: LoraExperts,
        batches: list[Batch],
        *,
        l1: float = DEFAULT_L1,
        loss_fn: LossFn = example_loss,
    ) -> None:
        if not batches:
            raise LoraHubError("LoraHub needs at least one example")
        if not (math.isfinite(l1) and l1 >= 0):
            raise LoraHubError(f"the L1 coefficient must be finite and >= 0 (got {l1})")
        self.am, self.experts, self.batches = am, experts, batches
        self.l1, self.loss_fn = l1, loss_fn
        raw = experts.config()
        config = method_for_peft_type("LORA").config_cls.from_peft(raw, where="composed LoRA")
        self.previous_active = list(am.active)
        am.add_adapter(SEARCH_ADAPTER, config, activate=False)
        try:
            self.modules = dict(am.named_adapter_modules(SEARCH_ADAPTER))
            self._check_fits()
            self.set_weights([0.0] * len(experts.adapters))  # and every shape fits
        except BaseException:
            self.remove()
            raise
        am.set_active([SEARCH_ADAPTER])

    def _check_fits(self) -> None:
        """The experts' saved keys are exactly the search adapter's (same modules)."""
        first = self.experts.adapters[0]
        state = adapter_tensors(first.modules, first.embedding, torch.float32)
        wanted = {saved_key(p, s) for p, m in self.modules.items() for s in m.peft_state()}
        unknown, missing = sorted(set(state) - wanted), sorted(wanted - set(state))
        if unknown:
            raise LoraHubError(
                f"{first.path}: tensor {unknown[0]!r} matches no module of the model "
                "(was the adapter trained for another base?)"
            )
        if missing:
            raise LoraHubError(
                f"{first.path}: the adapter has no {missing[0]!r}, which its target_modules "
                "select on this model"
            )

    def set_weights(self, weights: Sequence[float]) -> None:
        """Load the composition with ``weights`` into the search adapter."""
        first = self.experts.adapters[0]
        state = adapter_tensors(self.experts.compose(weights), first.embedding, torch.float32)
        for path, module in self.modules.items():
            own = {s: state[saved_key(path, s)] for s in module.peft_state()}
            module.load_peft_state(own, f"{first.path}: {path}")

    @torch.no_grad()
    def loss(self, weights: Sequence[float]) -> float:
        self.set_weights(weights)
        total, count = torch.zeros(()), 0
        device = next(self.am.model.parameters()).device
        for batch in self.batches:
            s, n = self.loss_fn(self.am, {k: v.to(device) for k, v in batch.items()})
            total, count = total + s.detach().cpu().double(), count + n
        if count == 0:
            raise LoraHubError("the examples have no target tokens to score")
        return float(total) / count

    def __call__(self, weights: Sequence[float]) -> float:
        penalty = self.l1 * sum(abs(w) for w in weights) / len(weights)
        return self.loss(weights) + penalty

    def remove(self) -> None:
        if SEARCH_ADAPTER in self.am.configs:
            self.am.delete_adapter(SEARCH_ADAPTER)
        self.am.set_active([n for n in self.previous_active if n in self.am.configs])


def lorahub_search(
    model: nn.Module,
    adapter_dirs: Sequence[str | os.PathLike[str]] | LoraExperts,
    batches: Iterable[Batch],
    *,
    budget: int = DEFAULT_BUDGET,
    seed: int = 0,
    l1: float = DEFAULT_L1,
    bounds: tuple[float, float] = DEFAULT_BOUNDS,
    loss_fn: LossFn = example_loss,
    progress: bool = False,
) -> LoraHubResult:
    """LoraHub's weights for the experts on the examples ``batches`` (model inputs plus
    ``labels``), with ``budget`` objective evaluations. ``model``: the base model, or an
    `AdapterModel` of it (a temporary adapter is added and removed; its active set is
    restored)."""
    from tqdm.auto import tqdm

    experts = (
        adapter_dirs if isinstance(adapter_dirs, LoraExperts) else LoraExperts.load(adapter_dirs)
    )
    am = model if isinstance(model, AdapterModel) else AdapterModel(model)
    was_training = am.model.training
    am.model.eval()
    objective = LoraHubObjective(am, experts, list(batches), l1=l1, loss_fn=loss_fn)
    bar = tqdm(total=budget, desc="lorahub", unit="eval", disable=not progress, leave=False)
    try:
        base_loss = objective.loss([0.0] * len(experts.adapters))

        def tick(_: int, __: float, best: float) -> None:
            bar.update(1)
            bar.set_postfix(best=f"{best:.4f}", refresh=False)

        found: SearchResult = cma_minimize(
            objective,
            len(experts.adapters),
            budget=budget,
            seed=seed,
            bounds=bounds,
            on_evaluation=tick,
        )
        loss = objective.loss(found.best_x)
    finally:
        bar.close()
        objective.remove()
        am.model.train(was_training)
    return LoraHubResult(
        weights=found.best_x,
        objective=found.best_value,
        loss=loss,
        base_loss=base_loss,
        adapters=[str(p) for p in experts.paths],
        evaluations=len(found.evaluations),
        history=found.evaluations,
    )


def lorahub(
    model: nn.Module,
    adapter_dirs: Sequence[str | os.PathLike[str]],
    batches: Iterable[Batch],
    out_dir: str | os.PathLike[str],
    *,
    overwrite: int | bool = False,
    allow_nonfinite: bool = False,
    **search: Any,
) -> LoraHubResult:
    """`lorahub_search`, then the composed adapter written as a PEFT LoRA folder at
    ``out_dir`` (checked before the search; the weights and adapters in its metadata)."""
    folder = OutputFolder(out_dir, overwrite=overwrite, inputs=list(adapter_dirs)).check()
    experts = LoraExperts.load(adapter_dirs)
    result = lorahub_search(model, experts, batches, **search)
    with folder as tmp:
        experts.write(result.weights, tmp, info=result.to_json(), allow_nonfinite=allow_nonfinite)
    return result
