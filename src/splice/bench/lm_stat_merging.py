"""Data-aware merge rows of `splice bench` on a causal-LM pool: fisher, regmean, fisher_graft,
regmean++, fw_merging.

The classifier pool's statistic rows (`splice.bench.stat_merging`) on LM experts, with the
same settings (``merge.params.<method>``: ``examples`` 256, ``batch_size`` 16, ``seed`` 0,
``per_example``; the α / λ sweeps), the same cache (`stat_merging.stats_file`: one
safetensors file per expert, statistic and data settings under ``bench/stats``, with the
collection's seconds and peak memory in its metadata) and the same row notes. Only the
data, the loss and the merge path are the LM pool's:

- data: expert k's own task's *train* split (`bench.lm_tasks`: texts, or prompt + answer
  pairs), a seeded sample of ``examples`` (`stat_merging.sample_indices`), tokenized as the
  expert was trained (`splice.train.data.lm_batches`, ``training.max_length``, right
  padding);
- model: the expert's HF folder in float32; a LoRA expert is its folded backbone (the LoRA
  pool's other dense rows merge the folded experts too, as the classifier pool's statistic
  rows do), so its Fisher covers every weight, not the adapter's;
- ``fisher`` / ``fisher_graft``: `collect_fisher` of the per-example mean next-token NLL
  (`splice.train.statistics.lm_losses`, what ``splice stats fisher`` takes of a causal LM),
  one example per backward pass (per_example); one float32 tensor per parameter;
- ``regmean``: `collect_gram` of the inputs of every ``nn.Linear`` except ``lm_head``
  (as the classifier pool leaves the head out; with tied embeddings ``lm_head`` is the
  input embedding, which has no Gram either), so RegMean averages the embedding / lm_head,
  the norms and every tensor without a Gram (`splice.merge.methods.regmean`); padding
  positions count in the Gram, as in the classifier pool (hence ``batch_size`` in the key);
- ``regmean++``: `splice.merge.regmean_plusplus` on the experts' whole causal LMs (the
  block list found is the decoder's ``model.layers``; the embedding, final norm and
  lm_head, outside the blocks, are averaged), the Grams on the merged model's activations
  of each expert's train sample in batches of ``batch_size``; not cached (they depend on
  the merge), so its merge time includes the data passes; α swept as RegMean's;
- ``fw_merging``: Frank-Wolfe (`splice.merge.frank_wolfe.fw_merge`), task k's objective
  the mean next-token NLL (`lm_losses`) of the merged model on one batch of task k's
  sample per iteration (the batches cycle), one row per ``variant`` as on the classifier
  pool (hard from task arithmetic λ 1, soft from the base).

fisher, regmean and fisher_graft merge by the native recipe with each expert's
``statistics:`` file through the engine (`bench.merging.merge_backbones`), exactly what
``splice merge`` runs. ``merge_seconds`` and ``peak_memory_mb`` (peak RSS growth,
`bench.memory.PeakRSS`) are the merge's (regmean++ and fw_merging: with their data passes).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from splice.bench.memory import PeakRSS
from splice.bench.stat_merging import data_note, run_fw_merge, sample_indices, stats_file

if TYPE_CHECKING:
    from splice.bench.experts import Expert
    from splice.bench.lm_evaluate import LMEvaluator
    from splice.bench.lm_run import LMRow
    from splice.bench.lm_tasks import LMTaskData
    from splice.bench.methods import PlannedMethod

KIND = {"fisher": "fisher", "fisher_graft": "fisher", "regmean": "gram"}  # cached ones
HEAD_PATTERN = r"(^|\.)lm_head$"  # Gram: the output projection left out (as the heads)


def train_sample(task: LMTaskData, data: dict[str, Any]) -> list[Any]:
    """Task ``task``'s seeded train sample (`stat_merging.sample_indices`)."""
    part = task.parts["train"]
    return [part[i] for i in sample_indices(len(part), data)]


def _inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != "labels"}


def lm_expert_statistics(
    e: Expert, task: LMTaskData, kind: str, data: dict[str, Any], tokenizer: Any, max_length: int
) -> tuple[Path, dict[str, str]]:
    """Expert ``e``'s ``kind`` statistics (fisher / gram) on its task's train sample: the
    cache file (collected and written on a miss) and its metadata (seconds, peak_mb,
    cached)."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from splice.merge.data_stats import collect_fisher, collect_gram, save_statistics
    from splice.train.data import lm_batches
    from splice.train.statistics import forward_inputs, lm_losses

    path = stats_file(e, task.identity(), kind, data, max_length)
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
        return path, {**meta, "cached": "true"}
    rows = train_sample(task, data)
    per_example = kind == "fisher" and bool(data.get("per_example", True))
    size = 1 if per_example else data["batch_size"]
    with PeakRSS() as mem:
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(e.folder, dtype=torch.float32).eval()
        batches = lm_batches(rows, tokenizer, size, max_length)
        if kind == "fisher":
            stats = collect_fisher(model, batches, lm_losses, per_example=per_example)
        else:
            stats = collect_gram(model, batches, forward=forward_inputs, exclude=[HEAD_PATTERN])
        del model
        secs = time.perf_counter() - start
    meta = {
        "format": "splice-statistics",
        "kind": kind,
        "task": task.name,
        "examples": str(len(rows)),
        "seconds": f"{secs:.2f}",
        "peak_mb": f"{mem.mb:.1f}",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_statistics(stats, path, meta)
    return path, {**meta, "cached": "false"}


class LMStatMerger:
    """One data-aware method on one kind's LM experts: the statistics files (cached) and
    the merges with them (the engine), or RegMean++ / FW-Merging with their data passes."""

    def __init__(
        self,
        ev: LMEvaluator,
        p: PlannedMethod,
        pool: list[Expert],
        max_length: int,
        base_folder: Path,
        seed: int,
    ):
        self.ev, self.p, self.base_folder, self.seed = ev, p, base_folder, seed
        self.tokenizer, self.max_length = ev.tokenizer, max_length
        self.folders = [e.folder for e in pool]
        self.tasks = [ev.tasks[e.tasks[0]] for e in pool]
        self.data = dict(p.statistics or {})
        self.paths: list[Path] = []
        self.info: list[dict[str, str]] = []
        self.peaks: dict[str, float] = {}
        if p.name in KIND:
            for e, task in zip(pool, self.tasks, strict=True):
                path, info = lm_expert_statistics(
                    e, task, KIND[p.name], self.data, ev.tokenizer, max_length
                )
                self.paths.append(path)
                self.info.append(info)

    def batches(self, task: LMTaskData) -> list[dict[str, torch.Tensor]]:
        """Task ``task``'s train sample in batches of ``batch_size`` (with labels)."""
        from splice.train.data import lm_batches

        rows = train_sample(task, self.data)
        return list(lm_batches(rows, self.tokenizer, self.data["batch_size"], self.max_length))

    def merge(self, params: dict[str, Any]) -> tuple[dict[str, torch.Tensor], float]:
        """The merged model for ``params`` and its seconds; records its peak memory."""
        from splice.bench.merging import merge_backbones

        with PeakRSS() as mem:
            if self.p.name == "regmean++":
                start = time.perf_counter()
                state = self._regmean_plusplus(params["alpha"])
                secs = time.perf_counter() - start
            else:
                state, secs = merge_backbones(
                    self.p.name,
                    params,
                    self.base_folder,
                    self.folders,
                    seed=self.seed,
                    statistics=self.paths,
                )
        self.peaks[_key(params)] = mem.mb
        return state, secs

    def _regmean_plusplus(self, alpha: float) -> dict[str, torch.Tensor]:
        from transformers import AutoModelForCausalLM

        from splice.merge.regmean_plusplus import regmean_plusplus

        models = [
            AutoModelForCausalLM.from_pretrained(f, dtype=torch.float32).eval()
            for f in self.folders
        ]
        batches = [[_inputs(b) for b in self.batches(t)] for t in self.tasks]
        merged = regmean_plusplus(models, batches, alpha=alpha, exclude=[HEAD_PATTERN])
        names = set(models[0].state_dict()) - _tied_twins(models[0])
        return {n: t.float() for n, t in merged.items() if n in names}

    def fw_row(self, variant: str, row: Any) -> LMRow:
        """FW-Merging's row for ``variant`` (hard / soft), scored on test; ``row``: the
        kind's row maker (`lm_run.make_row`)."""
        from splice.bench.lm_run import _load
        from splice.train.statistics import lm_losses

        params = self.p.params
        samples = [self.batches(t) for t in self.tasks]
        calls = [0] * len(self.tasks)

        def objective(k: int) -> Any:
            def loss(model: torch.nn.Module) -> torch.Tensor:
                batch = samples[k][calls[k] % len(samples[k])]
                calls[k] += 1
                return lm_losses(model, batch).mean()

            return loss

        ev = self.ev
        base = _load(self.base_folder)
        states = [_load(f) for f in self.folders]
        base = {n: base[n] for n in states[0] if n in base}
        res, secs, peak_mb = run_fw_merge(
            ev.model, base, states, [objective(k) for k in range(len(self.tasks))], variant, params
        )
        names = set(states[0])
        test = ev.evaluate({n: t.float() for n, t in res.state_dict.items() if n in names}, "test")
        names_t = [t.name for t in self.tasks]
        picks = "; ".join(",".join(names_t[i] if i < len(names_t) else "start" for i in it)
                          for it in res.picks)  # fmt: skip
        note = (
            f"{data_note(self.data, [])}; one batch of {self.data['batch_size']} per task and "
            f"iteration; picks per iteration: {picks}; objective "
            f"{res.losses[0]:.3f} -> {res.losses[-1]:.3f}; peak memory +{peak_mb:.0f} MiB"
        )
        shown = {"variant": variant, "iterations": params["iterations"]}
        return row(
            "merged", "fw_merging", test, params=shown, variant=variant,
            merge_seconds=round(secs, 2), note=note, peak_memory_mb=peak_mb,
        )  # fmt: skip

    def annotate(self, rows: list[LMRow]) -> list[LMRow]:
        """``rows`` with the data note and each merge's peak memory."""
        out = []
        for r in rows:
            peak = self.peaks.get(_key(r.params or {}))
            note = data_note(self.data, self.info)
            if self.p.name == "regmean++":
                note += "; Grams on the merged model's activations (in the merge time)"
            if peak is not None:
                note += f"; merge peak memory +{peak:.0f} MiB"
            out.append(dataclasses.replace(r, note=note, peak_memory_mb=peak))
        return out


def _tied_twins(model: torch.nn.Module) -> set[str]:
    """The state-dict names that share storage with an earlier one (tied lm_head)."""
    seen: set[int] = set()
    twins = set()
    for n, t in model.state_dict().items():
        if t.data_ptr() in seen and t.numel() > 0:
            twins.add(n)
        seen.add(t.data_ptr())
    return twins


def _key(params: dict[str, Any]) -> str:
    return repr(sorted(params.items()))
