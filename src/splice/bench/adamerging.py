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
steps 30, lr 0.02 and one batch per task per step instead of the paper's 500 steps at
1e-3 with two batches: the paper's schedule costs about 4000 forward and backward passes
over a four-task pool, some 25 times one bench expert's training (about 150 steps of 16
examples), while 30 steps cost about 120 passes (under one expert's training) and at lr
0.02 Adam can still move λ by up to 0.6 (the paper's schedule: 500 · 1e-3 = 0.5);
``density`` 0.2 (the paper's TIES K = 20) for ``adamerging++`` only.
"""

from __future__ import annotations

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
    steps: int = Field(30, gt=0)
    lr: float = Field(0.02, gt=0)
    init: float = 0.3
    clamp: bool = True
    batch_size: int = Field(16, gt=0)
    batches_per_step: int = Field(1, gt=0)
    density: float = Field(0.2, gt=0, le=1)
    seed: int = 0

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


def row_params(method: str, s: AdaMergingSettings, granularity: str) -> dict[str, Any]:
    """What a row shows of its settings."""
    out: dict[str, Any] = {"granularity": granularity, "steps": s.steps, "lr": s.lr}
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
