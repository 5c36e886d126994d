"""A lean training loop for adapters, and evaluation.

`fit` is plain PyTorch: AdamW over the trainable parameters (or given parameter groups, e.g.
LoRA+), linear warm-up then linear decay to 0, gradient clipping by global norm, a progress
bar with the running loss, and one log record per step. Nothing here knows about adapters:
any model whose forward returns ``.loss`` trains, so the same loop serves users' own models;
equally, an `AdapterModel` works in a user's own loop (its trainable parameters are the
adapter's).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class FitResult:
    """What `fit` did: optimizer steps, the last running loss (EMA, 0.9), wall seconds."""

    steps: int
    loss: float
    seconds: float

    def record(self) -> dict[str, Any]:
        """The fields of a training record (eval.json, a bench expert's meta.json)."""
        return {
            "steps": self.steps,
            "train_loss": self.loss,
            "train_seconds": round(self.seconds, 2),
            "steps_per_second": round(self.steps / max(self.seconds, 1e-9), 3),
        }


def linear_schedule(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    warmup = round(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def fit(
    model: torch.nn.Module,
    batches: Callable[[int], Iterable[Batch]],
    total_steps: int,
    *,
    lr: float = 5e-4,
    weight_decay: float = 0.0,
    warmup_ratio: float = 0.06,
    grad_clip: float | None = 1.0,
    param_groups: list[dict[str, Any]] | None = None,
    log: Callable[[dict[str, Any]], None] | None = None,
    evaluate: Callable[[], dict[str, float]] | None = None,
    eval_every: int = 0,
    progress: bool = True,
) -> FitResult:
    """Train for ``total_steps`` optimizer steps. ``batches(epoch)`` yields the batches of
    one pass (called again for the next epoch)."""
    groups = param_groups or [{"params": [p for p in model.parameters() if p.requires_grad]}]
    if not any(len(list(g["params"])) for g in groups):
        raise ValueError("no trainable parameters")
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(total_steps, warmup_ratio))
    trainable = [p for g in opt.param_groups for p in g["params"]]
    model.train()
    bar = tqdm(
        total=total_steps, desc="train", unit="step", disable=not progress, dynamic_ncols=True
    )
    step, epoch, running = 0, 0, math.nan
    start = time.perf_counter()

    def stream() -> Iterator[Batch]:
        nonlocal epoch
        while True:
            got = False
            for b in batches(epoch):
                got = True
                yield b
            if not got:
                raise ValueError("the training data produced no batch")
            epoch += 1

    for batch in stream():
        if step >= total_steps:
            break
        loss = model(**batch).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step {step}: loss is {loss.item()} (try a lower lr)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
        opt.step()
        sched.step()
        step += 1
        value = loss.item()
        running = value if math.isnan(running) else 0.9 * running + 0.1 * value
        bar.update(1)
        bar.set_postfix(loss=f"{running:.4f}")
        if log:
            log(
                {
                    "step": step,
                    "epoch": epoch,
                    "loss": value,
                    "lr": sched.get_last_lr()[0],
                    "elapsed_s": round(time.perf_counter() - start, 3),
                }
            )
        if evaluate and eval_every and step % eval_every == 0 and step < total_steps:
            metrics = evaluate()
            model.train()
            if log:
                log({"step": step, "eval": metrics})
    bar.close()
    model.eval()
    return FitResult(step, running, time.perf_counter() - start)


@torch.no_grad()
def evaluate_classification(model: torch.nn.Module, batches: Iterable[Batch]) -> dict[str, float]:
    from splice.data import accuracy, macro_f1

    model.eval()
    preds: list[int] = []
    gold: list[int] = []
    loss_sum, n = 0.0, 0
    for b in batches:
        out = model(**b)
        loss_sum += out.loss.item() * len(b["labels"])
        n += len(b["labels"])
        preds.extend(out.logits.argmax(-1).tolist())
        gold.extend(b["labels"].tolist())
    if not n:
        return {}
    return {
        "accuracy": accuracy(preds, gold),
        "macro_f1": macro_f1(preds, gold),
        "loss": loss_sum / n,
        "examples": n,
    }


@torch.no_grad()
def evaluate_lm(model: torch.nn.Module, batches: Iterable[Batch]) -> dict[str, float]:
    """Token-weighted mean cross-entropy of the labelled tokens, and perplexity."""
    model.eval()
    loss_sum, tokens = 0.0, 0
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        targets = b["labels"][:, 1:]
        ce = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
            targets.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        loss_sum += ce.item()
        tokens += int((targets != -100).sum())
    if not tokens:
        return {}
    mean = loss_sum / tokens
    return {"loss": mean, "perplexity": math.exp(min(mean, 50)), "tokens": tokens}
