"""AdaMerging rows of `splice bench`: coefficients learned on the unlabeled test inputs.

``merge.methods`` may name ``adamerging`` and ``adamerging++`` (`splice.train.adamerging`;
not part of ``core`` or ``all``: each row trains). Each gives one row per granularity
(task-wise, layer-wise) on every expert kind. The protocol is the paper's test-time
adaptation: each task's *test* inputs, without their labels, are the unlabeled batches
(shuffled once with ``seed``, then cut into batches of ``batch_size``), and the merged
backbone with each task's own expert head is scored on the same test split. No label and
no validation example is read while learning. The row's note says so and gives the
coefficient training time next to one expert's training time (the mean over the pool).

The forward pass is the evaluator's classifier skeleton run with functional weights
(`torch.func.functional_call`): the merged backbone tensors plus task k's head tensors.

Settings (``merge.params.adamerging`` / ``merge.params.adamerging++``), defaults:
granularity [task, layer]; init 0.3, clamp to [0, 1], Adam, batch size 16 (the paper's);
one batch per task per step; ``steps`` and ``lr`` ``auto``: a budget of forward and backward
passes instead of the paper's 500 steps at 1e-3 with two batches (about 4000 passes over a
four-task pool, 8000 over eight: some 25-50 times one bench expert's training).

- ``steps: auto`` = max(1, ⌊P / (K · batches_per_step)⌋), P the mean number of optimizer
  steps of the pool's experts' training and K the number of experts: AdaMerging runs at
  most as many forward and backward passes, each of one batch, as one expert's training did
  (a pass here costs about what a training step does: the backward reaches every merged
  weight, as a full fine-tune's does), so its training takes about one expert's time.
- ``lr: auto`` = 0.6 / steps: Adam moves a coefficient by at most about ``lr`` per step, so
  λ can still travel 0.6 from its init within the budget (the paper's schedule: 500 · 1e-3
  = 0.5).

Until 2026-12-04 the defaults were a fixed 30 steps at lr 0.02: 240 passes on eight tasks,
3-4 times one full expert's training. ``density`` 0.2 (the paper's TIES K = 20) for
``adamerging++`` only.
"""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field, field_validator

from splice.config_errors import StrictConfig, parse_config
from splice.errors import SpliceError

if TYPE_CHECKING:
    from splice.bench.backbone import State
    from splice.bench.evaluate import Evaluator
    from splice.train.adamerging import AdaMergingResult

DATA_AWARE = ("adamerging", "adamerging++")


class AdaMergingSettings(StrictConfig):
    granularity: list[Literal["task", "layer"]] = Field(
        default_factory=lambda: ["task", "layer"], min_length=1
    )
    steps: int | Literal["auto"] = "auto"
    lr: float | Literal["auto"] = "auto"
    init: float = 0.3
    clamp: bool = True
    batch_size: int = Field(16, gt=0)
    batches_per_step: int = Field(1, gt=0)
    density: float = Field(0.2, gt=0, le=1)
    seed: int = 0

    @field_validator("steps")
    @classmethod
    def _positive_steps(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v <= 0:
            raise ValueError(f"steps must be a positive integer or 'auto', got {v}")
        return v

    @field_validator("lr")
    @classmethod
    def _positive_lr(cls, v: float | str) -> float | str:
        if isinstance(v, float) and not (math.isfinite(v) and v > 0):
            raise ValueError(f"lr must be a positive number or 'auto', got {v}")
        return v

    @field_validator("granularity")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"granularity must be distinct, got {v}")
        return v


def parse_settings(method: str, given: dict[str, Any]) -> AdaMergingSettings:
    """``merge.params.<method>`` checked (unknown keys name the closest)."""
    if method == "adamerging" and "density" in given:
        raise SpliceError(
            "merge.params.adamerging: 'density' is the TIES trim of adamerging++; "
            "plain adamerging merges the whole task vectors"
        )
    return parse_config(
        AdaMergingSettings, given, f"merge.params.{method}", SpliceError, list_valid=True
    )


AUTO_TRAVEL = 0.6  # lr: auto = AUTO_TRAVEL / steps


def resolve_schedule(s: AdaMergingSettings, expert_steps: list[int | None]) -> AdaMergingSettings:
    """``s`` with ``steps`` and ``lr`` numbers: ``auto`` resolved from the pool's experts'
    training steps (``expert_steps``, one per expert, in the pool's order)."""
    steps = s.steps
    if steps == "auto":
        known = [int(x) for x in expert_steps if x]
        if not known:
            raise SpliceError(
                "merge.params: AdaMerging's steps: auto is set by the experts' training "
                "steps, which their cache does not record; give steps (and lr) as numbers"
            )
        budget = sum(known) / len(known)
        steps = max(1, math.floor(budget / (len(expert_steps) * s.batches_per_step)))
    lr = AUTO_TRAVEL / steps if s.lr == "auto" else s.lr
    return s.model_copy(update={"steps": steps, "lr": lr})


def row_params(method: str, s: AdaMergingSettings, granularity: str) -> dict[str, Any]:
    """What a row shows of its settings."""
    lr = round(s.lr, 6) if isinstance(s.lr, float) else s.lr
    out: dict[str, Any] = {"granularity": granularity, "steps": s.steps, "lr": lr}
    if method == "adamerging++":
        out["density"] = s.density
    return out


def unlabeled_batches(ev: Evaluator, task: str, batch_size: int, seed: int) -> list[dict]:
    """Task ``task``'s test inputs (never their labels), shuffled with ``seed``, tokenized
    in batches of ``batch_size``."""
    from splice.train.data import tokenize_batch

    texts = list(ev.tasks[task].parts["test"].texts)
    random.Random(seed).shuffle(texts)
    tok, n = ev.base.tokenizer, ev.max_length
    return [
        tokenize_batch(tok, texts[i : i + batch_size], n) for i in range(0, len(texts), batch_size)
    ]


def learn_merge(
    ev: Evaluator,
    method: str,
    s: AdaMergingSettings,
    granularity: str,
    base: State,
    experts: list[State],
    heads: dict[str, State],
    tasks: list[str],
) -> AdaMergingResult:
    """AdaMerging (``method``: plain or ++) of the expert backbones, task k's unlabeled test
    batches through head ``heads[tasks[k]]``; the merged backbone and its coefficients."""
    from torch.func import functional_call

    from splice.bench.precision import autocast
    from splice.train.adamerging import adamerging

    if s.steps == "auto" or s.lr == "auto":
        raise ValueError("learn_merge takes numbers: resolve_schedule the settings first")
    model = ev.model.eval()
    prefix = ev.base.head_name + "."
    head_params = [{prefix + n: v.float() for n, v in heads[t].items()} for t in tasks]
    batches = [unlabeled_batches(ev, t, s.batch_size, s.seed) for t in tasks]

    def forward(params: Any, k: int, batch: dict) -> torch.Tensor:
        with autocast(ev.precision):
            out = functional_call(model, {**params, **head_params[k]}, args=(), kwargs=batch)
        return out.logits.float()

    return adamerging(
        base,
        experts,
        batches,
        forward,
        granularity="task" if granularity == "task" else "layer",
        init=s.init,
        clamp=(0.0, 1.0) if s.clamp else None,
        lr=s.lr,
        steps=s.steps,
        batches_per_step=s.batches_per_step,
        ties_density=s.density if method == "adamerging++" else None,
        seed=s.seed,
    )


def row_note(result: AdaMergingResult, tasks: list[str], expert_seconds: list[float | None]) -> str:
    """The protocol, the learned coefficients (per expert; layer-wise: mean over tensors)
    and the training time against one expert's."""
    lam = result.coefficients
    per_expert = lam if lam.dim() == 1 else lam.mean(dim=1)
    what = "λ" if lam.dim() == 1 else f"mean λ over {lam.shape[1]} tensors"
    coeffs = ", ".join(f"{t} {float(v):.3f}" for t, v in zip(tasks, per_expert, strict=True))
    note = (
        "coefficients learned by entropy minimization on the unlabeled test inputs (labels "
        f"unused; the paper's test-time protocol); {what} per expert: {coeffs}; "
        f"training {result.seconds:.1f} s"
    )
    known = [x for x in expert_seconds if x is not None]
    if known:
        one = sum(known) / len(known)
        note += f" = {result.seconds / max(one, 1e-9):.2f}x one expert's training ({one:.1f} s)"
    return note
