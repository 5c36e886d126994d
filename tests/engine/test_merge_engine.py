"""End-to-end merges through the engine: values, layout, whole-model trim, resume, seeds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from splice.engine import execute as execute_mod
from splice.engine import plan_merge, run_merge
from splice.recipe.schema import parse_recipe
from splice.reference import open_checkpoint


def merge(recipe: dict, out: Path, **kw) -> Path:
    plan = plan_merge(parse_recipe(recipe))
    try:
        run_merge(plan, out, progress=False, **kw)
    finally:
        plan.close()
    return out


def load_all(path: Path) -> dict[str, torch.Tensor]:
    r = open_checkpoint(str(path))
    try:
        return {n: r.read(n) for n in r.names()}
    finally:
        r.close()


def test_task_arithmetic_values_layout_and_metadata(models, tmp_path):
    recipe = {
        "method": "task_arithmetic",
        "base_model": models["base"],
        "models": [
            {"model": models["ft0"], "parameters": {"weight": 0.5}},
            {"model": models["ft1"], "parameters": {"weight": 2.0}},
        ],
        "parameters": {"lambda": 0.5},
    }
    out = merge(recipe, tmp_path / "out", shard_bytes=700)
    t = models["tensors"]
    got = load_all(out)
    assert list(got) == list(t["base"])
    for n, b in t["base"].items():
        want = b + 0.5 * (0.5 * (t["ft0"][n] - b) + 2.0 * (t["ft1"][n] - b))
        torch.testing.assert_close(got[n], want, rtol=0, atol=1e-6)
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" in files and "config.json" in files
    assert "tokenizer.json" in files and "splice_recipe.yaml" in files
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted({*index["weight_map"].values()})
    assert len(shards) > 1 and shards[0].startswith("model-00001-of-")
    with safe_open(str(out / shards[0]), framework="pt") as f:
        meta = f.metadata()
    assert "task_arithmetic" in meta["splice_recipe"] and meta["splice_version"]
    # each shard loads with the official library
    for s in shards:
        load_file(str(out / s))
    assert not (tmp_path / "out.splice-partial").exists()


def _global_topk_mask(deltas: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    flat = torch.cat([d.reshape(-1) for d in deltas]).abs()
    idx = flat.argsort(descending=True)[:k]
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[idx] = True
    out, o = [], 0
    for d in deltas:
        out.append(mask[o : o + d.numel()].reshape(d.shape))
        o += d.numel()
    return out


def _whole_model_trims(t: dict, names: list[str], dens: list[float]) -> list[dict]:
    """Per model i: name -> δ_i = ft_i − base with only its round(d_i · N) largest |entries|
    over all of ``names`` (N entries) kept."""
    n_total = sum(t["base"][n].numel() for n in names)
    out = []
    for i, d in enumerate(dens):
        deltas = [t[f"ft{i}"][n] - t["base"][n] for n in names]
        masks = _global_topk_mask(deltas, round(d * n_total))
        assert sum(int(m.sum()) for m in masks) == round(d * n_total)
        out.append({n: x * m for n, x, m in zip(names, deltas, masks)})
    return out


def test_ties_whole_model_trim_matches_bruteforce(models, tmp_path):
    t = models["tensors"]
    names = list(t["base"])
    dens = [0.2, 0.5]
    recipe = {
        "method": "ties",
        "base_model": models["base"],
        "models": [
            {"model": models[f"ft{i}"], "parameters": {"density": d}} for i, d in enumerate(dens)
        ],
        "parameters": {"scope": "model"},
    }
    got = load_all(merge(recipe, tmp_path / "out", threads=2))
    trimmed = _whole_model_trims(t, names, dens)
    for n in names:
        a, b = trimmed[0][n], trimmed[1][n]
        sign = torch.where(a + b >= 0, 1.0, -1.0)
        agree_a = (torch.sign(a) == sign).float()
        agree_b = (torch.sign(b) == sign).float()
        num = a * agree_a + b * agree_b
        den = (agree_a + agree_b).clamp(min=1)
        torch.testing.assert_close(got[n], t["base"][n] + num / den, rtol=0, atol=1e-6)


def test_whole_model_trim_leaves_out_tensors_kept_whole(models, tmp_path):
    """A tensor every model keeps whole (density 1 through a filter) is not trimmed and not
    counted in the whole-model N: the others are trimmed as if it were not merged at all
    (what AdaMerging++'s recipe needs for a classifier head the base shares)."""
    t = models["tensors"]
    names = list(t["base"])
    whole = [n for n in names if "mlp" in n]
    ranked = [n for n in names if n not in whole]
    assert whole and ranked
    dens = [0.2, 0.5]

    def density(d):
        return [{"filter": "mlp", "value": 1.0}, {"value": d}]

    recipe = {
        "method": "ties",
        "base_model": models["base"],
        "models": [
            {"model": models[f"ft{i}"], "parameters": {"density": density(d)}}
            for i, d in enumerate(dens)
        ],
        "parameters": {"scope": "model", "disjoint": "sum"},
    }
    got = load_all(merge(recipe, tmp_path / "out", threads=2))
    trimmed = _whole_model_trims(t, ranked, dens)
    for i, kept in enumerate(trimmed):
        kept |= {n: t[f"ft{i}"][n] - t["base"][n] for n in whole}
    for n in names:
        a, b = trimmed[0][n], trimmed[1][n]
        sign = torch.where(a + b >= 0, 1.0, -1.0)
        num = a * (torch.sign(a) == sign) + b * (torch.sign(b) == sign)
        torch.testing.assert_close(got[n], t["base"][n] + num, rtol=0, atol=1e-6)


def test_layer_gradient_and_filter(models, tmp_path):
    t = models["tensors"]
    recipe = {
        "method": "task_arithmetic",
        "base_model": models["base"],
        "models": [
            {
                "model": models["ft0"],
                "parameters": {"weight": [{"filter": "mlp", "value": [0.0, 1.0]}, {"value": 3.0}]},
            }
        ],
    }
    got = load_all(merge(recipe, tmp_path / "out"))
    b, f = t["base"], t["ft0"]
    for i, w in enumerate([0.0, 0.5, 1.0]):  # t = i / (3 - 1)
        n = f"model.layers.{i}.mlp.up_proj.weight"
        torch.testing.assert_close(got[n], b[n] + w * (f[n] - b[n]), rtol=0, atol=1e-6)
    n = "model.layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(got[n], b[n] + 3.0 * (f[n] - b[n]), rtol=0, atol=1e-6)


def test_slices_stack_layers_and_update_config(models, tmp_path):
    t = models["tensors"]
    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": models["ft0"], "layer_range": [0, 2]}]},
            {"sources": [{"model": models["ft1"], "layer_range": [1, 3]}]},
        ],
    }
    out = merge(recipe, tmp_path / "out")
    got = load_all(out)
    q = "self_attn.q_proj.weight"
    assert torch.equal(got[f"model.layers.0.{q}"], t["ft0"][f"model.layers.0.{q}"])
    assert torch.equal(got[f"model.layers.1.{q}"], t["ft0"][f"model.layers.1.{q}"])
    assert torch.equal(got[f"model.layers.2.{q}"], t["ft1"][f"model.layers.1.{q}"])
    assert torch.equal(got[f"model.layers.3.{q}"], t["ft1"][f"model.layers.2.{q}"])
    assert torch.equal(got["model.embed_tokens.weight"], t["ft0"]["model.embed_tokens.weight"])
    assert torch.equal(got["lm_head.weight"], t["ft1"]["lm_head.weight"])
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4


def test_random_method_is_deterministic_per_seed(models, tmp_path):
    def run(seed: int, name: str) -> dict[str, torch.Tensor]:
        recipe = {
            "method": "dare_linear",
            "base_model": models["base"],
            "seed": seed,
            "models": [{"model": models["ft0"]}, {"model": models["ft1"]}],
            "parameters": {"density": 0.5},
        }
        return load_all(merge(recipe, tmp_path / name, threads=3))

    a, b, c = run(1, "a"), run(1, "b"), run(2, "c")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_resume_after_a_crash_is_bit_identical(models, tmp_path, monkeypatch):
    recipe = {
        "method": "dare_ties",
        "base_model": models["base"],
        "models": [{"model": models[f"ft{i}"]} for i in range(3)],
        "parameters": {"density": 0.5},
    }
    ref = merge(recipe, tmp_path / "ref", shard_bytes=600, threads=1)

    real_call = execute_mod._Runner.__call__
    calls = {"n": 0}

    def crashing(self, index):
        calls["n"] += 1
        if calls["n"] > 6:
            raise KeyboardInterrupt  # the user pressed Ctrl-C midway
        return real_call(self, index)

    monkeypatch.setattr(execute_mod._Runner, "__call__", crashing)
    with pytest.raises(KeyboardInterrupt):
        merge(recipe, tmp_path / "out", shard_bytes=600, threads=1)
    assert not (tmp_path / "out").exists()
    partial = tmp_path / "out.splice-partial"
    done_before = [p.name for p in partial.glob("*.safetensors")]
    assert done_before  # some shards were completed before the crash
    monkeypatch.setattr(execute_mod._Runner, "__call__", real_call)

    plan = plan_merge(parse_recipe(recipe))
    try:
        report = run_merge(
            plan, tmp_path / "out", shard_bytes=600, threads=1, resume=True, progress=False
        )
    finally:
        plan.close()
    assert report.skipped > 0 and report.tensors < len(plan.jobs)
    for f in sorted(ref.glob("*.safetensors")):
        assert (tmp_path / "out" / f.name).read_bytes() == f.read_bytes()


def test_mergekit_noop_parameters_accepted_only_in_mergekit_dialect(models, tmp_path):
    from splice.errors import MergeValidationError

    common = {"base_model": models["base"], "models": [{"model": models["ft0"]}]}
    plain = load_all(
        merge({"merge_method": "ties", **common, "parameters": {"density": 0.5}}, tmp_path / "a")
    )
    noop = load_all(
        merge(
            {"merge_method": "ties", **common, "parameters": {"density": 0.5, "int8_mask": True}},
            tmp_path / "b",
        )
    )
    assert all(torch.equal(plain[n], noop[n]) for n in plain)
    with pytest.raises(MergeValidationError, match="no parameter 'int8_mask'"):
        plan_merge(
            parse_recipe(
                {"method": "ties", **common, "parameters": {"density": 0.5, "int8_mask": True}}
            )
        )


def test_memory_budget_bounds_jobs_in_flight(models, tmp_path, monkeypatch):
    import threading
    import time

    real_call = execute_mod._Runner.__call__
    state = {"now": 0, "max": 0}
    lock = threading.Lock()

    def tracking(self, index):
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        time.sleep(0.01)
        try:
            return real_call(self, index)
        finally:
            with lock:
                state["now"] -= 1

    monkeypatch.setattr(execute_mod._Runner, "__call__", tracking)
    recipe = {"method": "linear", "models": [{"model": models["ft0"]}, {"model": models["ft1"]}]}
    tiny = load_all(merge(recipe, tmp_path / "a", threads=4, memory_budget=1))
    assert state["max"] == 1  # every job exceeds 1 byte: each runs alone
    state["max"] = 0
    roomy = load_all(merge(recipe, tmp_path / "b", threads=4, memory_budget=10**9))
    assert state["max"] > 1
    assert all(torch.equal(tiny[n], roomy[n]) for n in tiny)
