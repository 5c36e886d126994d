"""Helpers of the bench tests: the tiny runs' configs (classifier and causal-LM pools)."""

from __future__ import annotations

from pathlib import Path

# The tiny tasks' vocabulary: label keywords per class of each task, filler words, specials.
FILLERS = ["the", "movie", "was", "film", "plot", "very", "quite", "and", "really", "a"]
TASKS = {
    "sentiment": {"pos": ["good", "great", "nice"], "neg": ["bad", "awful", "poor"]},
    "topic": {
        "sport": ["goal", "match", "team"],
        "food": ["bread", "soup", "cheese"],
        "tech": ["code", "chip", "robot"],
    },
}
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_config(model: Path, tasks: list[Path], **over) -> dict:
    cfg = {
        "model": str(model),
        "tasks": [str(p) for p in tasks],
        "data": {"train_per_class": 60, "validation_max": 60, "test_max": 90},
        "training": {"epochs": 12, "batch_size": 16, "max_length": 16, "head_lr": 0.01},
        "full": {"lr": 0.001},
        "lora": {
            "lr": 0.005,
            "r": 8,
            "alpha": 16,
            "target_modules": ["query", "key", "value", "dense"],
        },
        "merge": {
            "methods": ["linear", "task_arithmetic", "ties"],
            "grids": {"task_arithmetic": {"lambda": [0.5, 1.0]}, "ties": {"lambda": [0.6, 1.0]}},
        },
        "precision": "float32",
        "eval_batch_size": 32,
    }
    for key, value in over.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
    return cfg


def tiny_lm_config(model: Path, tasks: list[str], **over) -> dict:
    """The tiny Llama pool (`tiny_lm_pool`): full and LoRA experts of 4 steps, task
    arithmetic with a two-point grid (default λ = 0 on it), linear, lora:svd."""
    cfg = {
        "model": str(model),
        "tasks": tasks,
        "kinds": ["full", "lora"],
        "training": {"epochs": 2, "batch_size": 8, "max_length": 16, "warmup_ratio": 0.0},
        "full": {"lr": 3e-3},
        "lora": {"lr": 1e-2, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "merge": {
            "methods": ["task_arithmetic", "linear", "lora:svd"],
            "params": {"task_arithmetic": {"lambda": 0.0}},
            "grids": {"task_arithmetic": {"lambda": [0.0, 0.5]}},
        },
        "lm": {"max_new_tokens": 3},
        "eval_batch_size": 8,
        "compose": [],
    }
    cfg.update(over)
    return cfg


def without_keys(value, keys: set[str]):
    """A results.json part without the entries named ``keys`` at any depth (timings: they
    differ between any two runs)."""
    if isinstance(value, dict):
        return {k: without_keys(v, keys) for k, v in value.items() if k not in keys}
    if isinstance(value, list):
        return [without_keys(v, keys) for v in value]
    return value


class FakePool:
    """A Ray pool stand-in for the units tests: runs a unit at once with ``result(params,
    splits)``; the merge whose lambda is ``fail`` returns the error a failing unit sends."""

    def __init__(self, fail, result):
        self.fail, self.result = fail, result

    def submit(self, fn, spec, kind, method, params, splits):
        if params.get("lambda") == self.fail:
            return {"error": "SpliceError: the weighted mean direction is zero"}
        return self.result(params, splits)

    def gather(self, refs, on_done=None):
        for i in range(len(refs) if on_done is not None else 0):
            on_done(i)
        return refs


def local_ray_and_rerun(cfg, root: Path) -> dict:
    """``cfg`` run locally (cache ``root/a``), on a local Ray on its own cache (``root/b``),
    and on Ray again on the local run's cache; each run's results by name (local, ray,
    rerun), their outputs in ``root/NAME``. Needs Ray started (the ``local_ray`` fixture)."""
    import pytest

    from splice.bench.run import run_bench

    out = {}
    with pytest.MonkeyPatch.context() as mp:
        for name, cache, on in (
            ("local", "a", None),
            ("ray", "b", "local"),
            ("rerun", "a", "local"),
        ):
            mp.setenv("SPLICE_CACHE", str(root / cache))
            out[name] = run_bench(cfg, root / name, progress=False, ray=on)
    return out
