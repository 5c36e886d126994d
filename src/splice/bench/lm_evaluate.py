"""Score causal LMs on the LM pool's tasks: held-out loss / perplexity, greedy exact match.

- ``lm`` tasks: loss = Σ_tokens CE / #tokens over the held-out texts (the token-weighted
  mean of `splice.train.loop.evaluate_lm`, what ``splice train`` reports), perplexity =
  exp(loss). Batches are tokenized once per split (`splice.train.data.lm_batches`: BOS,
  the text, EOS; truncated to ``max_length``).
- ``exact_match`` tasks: the prompt (BOS + prompt tokens, as in training) is decoded
  greedily for at most ``max_new_tokens`` tokens, stopping at EOS; the text generated is
  cut at its first newline and stripped, and is right when it equals the stripped answer.
  Prompts are left-padded in batches (`transformers`' ``generate`` with an attention mask
  and ``do_sample=False``; the test checks it against an unbatched argmax loop).

Normalization against the experts (the classification table's "merged relative to each
expert on its own task"):

- exact match: merged / expert, as normalized accuracy (`splice.data.normalized_accuracy`);
- loss: the share of the expert's gain over the pretrained model that the merged model
  keeps, ``(L_pre − L_merged) / (L_pre − L_expert)``: 1 = as good as the expert, 0 = no
  better than the pretrained model, < 0 = worse than it. A plain loss ratio
  L_expert / L_merged is not used because cross-entropy does not go to 0 (its floor is
  the text's entropy), so a ratio near 1 hides most of the difference fine-tuning makes;
  the gain share is zero-anchored on the model every merge starts from, as task vectors
  are. Undefined (None) when the expert does not beat the pretrained model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from splice.bench.lm_tasks import LMTaskData
from splice.train.data import LMExample, lm_batches
from splice.train.loop import evaluate_lm

Metrics = dict[str, float]


def normalized_loss(pretrained: float, merged: float, expert: float) -> float | None:
    """(L_pre − L_merged) / (L_pre − L_expert); None when L_expert ≥ L_pre."""
    gain = pretrained - expert
    if not gain > 0:
        return None
    return (pretrained - merged) / gain


def normalized_exact_match(merged: float, expert: float) -> float | None:
    return merged / expert if expert > 0 else None


def answer_of(generated: str) -> str:
    """The answer in a generated text: up to its first newline, stripped."""
    return generated.split("\n", 1)[0].strip()


def exact_match(generated: Sequence[str], answers: Sequence[str]) -> float:
    """Share of generated texts whose answer equals the stripped reference answer."""
    if len(generated) != len(answers) or not answers:
        raise ValueError(f"{len(generated)} generations for {len(answers)} answers")
    right = sum(answer_of(g) == a.strip() for g, a in zip(generated, answers, strict=True))
    return right / len(answers)


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """BOS + the prompt's tokens, as `splice.train.data.lm_encode` starts a training row."""
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    return bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def generate_greedy(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 16,
) -> list[str]:
    """Greedy continuations (special tokens dropped), left-padded batches."""
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        rows = [prompt_ids(tokenizer, p) for p in prompts[start : start + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = 1
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        for row in gen[:, width:]:
            out.append(tokenizer.decode(row.tolist(), skip_special_tokens=True))
    return out


class LMEvaluator:
    """One causal-LM skeleton; each task's validation and test parts prepared once."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        tasks: list[LMTaskData],
        max_length: int,
        batch_size: int,
        max_new_tokens: int,
    ):
        from splice.train.lm_objective import LMLossObjective

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.tasks = {t.name: t for t in tasks}
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.batches: dict[tuple[str, str], list[dict[str, torch.Tensor]]] = {}
        for t in tasks:
            for split in ("validation", "test"):
                if t.kind == "lm":
                    self.batches[(t.name, split)] = list(
                        lm_batches(t.parts[split], tokenizer, batch_size, max_length)
                    )
        every = [b for bs in self.batches.values() for b in bs]
        if not every:  # exact-match tasks only: their answers are the loader's check batches
            every = list(lm_batches(tasks[0].parts["validation"], tokenizer, 4, max_length))
        # state loading with tied-weight checks (`LMLossObjective.load`), one place for it
        self._loader = LMLossObjective(self.model, every)

    def load(self, state: dict[str, torch.Tensor]) -> None:
        self._loader.load(state)

    def score_task(self, name: str, split: str) -> Metrics:
        task = self.tasks[name]
        if task.kind == "lm":
            r = evaluate_lm(self.model, self.batches[(name, split)])
            return {"loss": r["loss"], "perplexity": r["perplexity"]}
        examples: list[LMExample] = task.parts[split]
        gen = generate_greedy(
            self.model,
            self.tokenizer,
            [e.prompt for e in examples],
            self.max_new_tokens,
            self.batch_size,
        )
        return {"exact_match": exact_match(gen, [e.completion for e in examples])}

    def evaluate(
        self, state: dict[str, torch.Tensor] | None, split: str, tasks: list[str] | None = None
    ) -> dict[str, Metrics]:
        """Metrics per task of ``state`` (None: what is loaded) on ``split``."""
        if state is not None:
            self.load(state)
        return {n: self.score_task(n, split) for n in tasks or list(self.tasks)}


def primary(metrics: Metrics) -> float:
    """The task's headline value: exact match, else loss."""
    return metrics["exact_match"] if "exact_match" in metrics else metrics["loss"]


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
