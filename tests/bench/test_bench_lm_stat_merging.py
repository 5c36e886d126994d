"""Data-aware rows of `splice bench` on the causal-LM pool (`splice.bench.lm_stat_merging`)
with the tiny Llama: rows on both kinds, values against the library and against a hand
computation, the statistics cache, the "Not run" reasons."""

from __future__ import annotations

import math

import pytest
import torch
from bench_test_util import tiny_lm_config

import splice.bench.merging as bench_merging
from splice.bench import parse_bench_config, run_bench
from splice.bench.lm_run import _load, not_applicable
from splice.bench.methods import select_methods
from splice.merge.data_stats import load_statistics

METHODS = {
    "methods": ["linear", "fisher", "regmean", "regmean++", "fisher_graft", "fw_merging"],
    "grids": {"regmean": {"alpha": [0.5, 0.9]}, "regmean++": {"alpha": [0.5, 0.9]}},
    "params": {
        "fisher": {"examples": 12},
        "regmean": {"examples": 12, "batch_size": 4},
        "regmean++": {"examples": 8, "batch_size": 4},
        "fisher_graft": {"examples": 12, "density": 0.5},
        "fw_merging": {"examples": 8, "batch_size": 4, "iterations": 2},
    },
}


def _cfg(model, tasks, **merge):
    data = tiny_lm_config(model, tasks, merge={**METHODS, **merge})
    return parse_bench_config({**data, "baselines": {"probe": True, "multitask": False}})


@pytest.fixture(scope="module")
def run(tiny_lm_pool, tmp_path_factory):
    """One run of every data-aware method on both kinds; the merges the engine made."""
    model, tasks = tiny_lm_pool
    root = tmp_path_factory.mktemp("bench-lm-stats")
    merges = []
    real = bench_merging.merge_backbones

    def recording(method, params, base, experts, **kw):
        state, secs = real(method, params, base, experts, **kw)
        merges.append((method, dict(params), list(experts), kw.get("statistics"), state))
        return state, secs

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPLICE_CACHE", str(root / "cache"))
        mp.setattr(bench_merging, "merge_backbones", recording)
        res = run_bench(_cfg(model, tasks), root / "out", progress=False)
    return res, root, merges


def test_rows_on_both_kinds(run):
    res, root, _ = run
    assert res.failed == []
    assert {s.name for s in res.skipped} == {"linear probe"}
    for kind in ("full", "lora"):
        rows = {(r.method, r.variant): r for r in res.rows if r.kind == kind}
        for want in [
            ("fisher", "default"),
            ("regmean", "default"),
            ("regmean", "tuned"),
            ("regmean++", "default"),
            ("regmean++", "tuned"),
            ("fisher_graft", "default"),
            ("fisher_graft", "tuned"),
            ("fw_merging", "hard"),
            ("fw_merging", "soft"),
        ]:
            r = rows[want]
            assert all(math.isfinite(m["loss"]) for n, m in r.test.items() if "loss" in m)
            assert r.avg_normalized is not None and math.isfinite(r.avg_normalized)
            assert r.merge_seconds is not None and r.merge_seconds > 0
            assert r.peak_memory_mb is not None and r.note.startswith("data: up to")
        assert rows[("regmean", "default")].params == {"alpha": 0.9}
        assert "0/3 from the cache" in rows[("fisher", "default")].note
        # fisher_graft reads the Fisher files fisher wrote (the same data settings)
        assert "from the cache" in rows[("fisher_graft", "default")].note
    md = (root / "out" / "results.md").read_text()
    assert "Notes:" in md and "gram statistics collected" in md
    assert len(list((root / "cache" / "bench" / "stats").glob("gram-*"))) == 6


def test_regmean_row_is_the_library_merge_of_the_cached_grams(run):
    """The RegMean merges are `merge_with_statistics` on the experts and the cached Grams;
    the Grams cover every linear layer but lm_head, so the (tied) embedding is averaged."""
    from splice.merge.data_merge import merge_with_statistics

    _, _, merges = run
    done = [m for m in merges if m[0] == "regmean"]
    assert sorted(m[1]["alpha"] for m in done) == [0.5, 0.5, 0.9, 0.9]  # two kinds
    for _, params, folders, stats, state in done:
        experts = [_load(f) for f in folders]
        grams = [load_statistics(s) for s in stats]
        assert all("lm_head.weight" not in g for g in grams)
        linears = [n for n in experts[0] if n.endswith("_proj.weight")]
        assert sorted(grams[0]) == sorted(linears)
        want = merge_with_statistics("regmean", experts, grams, alpha=params["alpha"])
        assert sorted(state) == sorted(want)
        for n in want:
            torch.testing.assert_close(state[n], want[n].float(), rtol=1e-5, atol=1e-6)
        emb = "model.embed_tokens.weight"
        mean = sum(e[emb] for e in experts) / len(experts)
        torch.testing.assert_close(state[emb], mean, rtol=1e-5, atol=1e-6)
        q = "model.layers.0.self_attn.q_proj.weight"
        q_mean = sum(e[q] for e in experts) / len(experts)
        if not torch.equal(experts[0][q], experts[1][q]):
            assert not torch.allclose(state[q], q_mean, atol=1e-6)  # the Grams matter


def test_fisher_file_is_the_mean_squared_gradient(run, tiny_lm_pool):
    """One expert's cached Fisher of the final norm, against a hand loop: per train example
    of the seeded sample, the gradient of the mean next-token NLL, squared, averaged."""
    import random

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from splice.bench.lm_tasks import prepare_lm_task
    from splice.train.data import lm_encode

    _, root, _ = run
    model_dir, tasks = tiny_lm_pool
    cfg = _cfg(model_dir, tasks)
    folder = next(
        f for f in (root / "cache" / "bench" / "lm-experts").glob("full-abc-*") if f.is_dir()
    )
    path = next((root / "cache" / "bench" / "stats").glob(f"fisher-{folder.name}-*"))
    fisher = load_statistics(path)["model.norm.weight"]
    task = prepare_lm_task(tasks[0], cfg.data)
    train = task.parts["train"]
    rows = [train[i] for i in random.Random(0).sample(range(len(train)), 12)]
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    total = torch.zeros_like(fisher)
    for row in rows:
        ids, labels = lm_encode(row, tok, cfg.training.max_length)
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
        target = torch.tensor(labels[1:])
        loss = torch.nn.functional.cross_entropy(logits, target, ignore_index=-100)
        (g,) = torch.autograd.grad(loss, [model.model.norm.weight])
        total += g.square()
    torch.testing.assert_close(fisher, total / len(rows), rtol=1e-4, atol=1e-10)


def test_rerun_reads_the_statistics_from_the_cache(run, tiny_lm_pool, monkeypatch):
    """A second run with the same cache collects nothing (the collectors would raise) and
    gives the same fisher / regmean rows."""
    import splice.merge.data_stats as data_stats

    res, root, _ = run
    model, tasks = tiny_lm_pool

    def refuse(*a, **k):
        raise AssertionError("statistics collected again")

    monkeypatch.setattr(data_stats, "collect_fisher", refuse)
    monkeypatch.setattr(data_stats, "collect_gram", refuse)
    monkeypatch.setenv("SPLICE_CACHE", str(root / "cache"))
    again = run_bench(
        _cfg(model, tasks, methods=["fisher", "regmean"]), root / "o2", progress=False
    )
    assert again.failed == []
    for kind in ("full", "lora"):
        key = lambda r: (r.method, r.variant)  # noqa: E731
        first = {key(r): r.test for r in res.rows if r.kind == kind}
        rows = [r for r in again.rows if r.kind == kind and r.group == "merged"]
        assert {r.method for r in rows} == {"fisher", "regmean"}
        assert all(r.test == first[key(r)] for r in rows)
        assert all("3/3 from the cache" in r.note for r in rows)


def test_not_run_reasons(tiny_lm_pool):
    """On an LM pool only AdaMerging is not run (its entropy objective needs a classifier);
    the statistic methods are planned, not listed as not run."""
    model, tasks = tiny_lm_pool
    methods = ["adamerging", "fisher", "regmean", "regmean++", "fisher_graft", "fw_merging"]
    data = tiny_lm_config(model, tasks, merge={"methods": methods})
    cfg = parse_bench_config({**data, "baselines": {"probe": False, "multitask": False}})
    planned, skipped = select_methods(methods, 3)
    assert skipped == []
    reasons = {s.name: s.reason for s in not_applicable(cfg, planned)}
    assert reasons == {"adamerging": "AdaMerging's entropy objective needs a classifier"}
