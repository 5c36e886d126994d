"""Data-aware rows of `splice bench` (fisher, regmean, regmean++, fisher_graft, fw_merging)
on the tiny BERT: rows on both kinds, values against the library, the statistics cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from bench_test_util import tiny_config
from safetensors.torch import load_file

from splice.bench import parse_bench_config, run_bench
from splice.bench.methods import select_methods
from splice.errors import SpliceError

METHODS = {
    "methods": ["linear", "fisher", "regmean", "regmean++", "fisher_graft", "fw_merging"],
    "grids": {"regmean": {"alpha": [0.5, 0.9]}, "fisher_graft": {"lambda": [0.5, 1.0]}},
    "params": {
        "fisher": {"examples": 24},
        "regmean": {"examples": 24, "batch_size": 8},
        "regmean++": {"examples": 16, "batch_size": 8},
        "fisher_graft": {"examples": 24, "density": 0.5},
        "fw_merging": {"examples": 16, "batch_size": 8, "iterations": 2},
    },
    "sweep": True,
}


def _config(tiny_bert, tiny_tasks, **merge):
    data = tiny_config(
        tiny_bert, tiny_tasks, kinds=["full", "lora"], merge={**METHODS, **merge}, compose=[]
    )
    data["baselines"] = {"probe": False, "multitask": False}
    data["training"]["epochs"] = 4
    data["merge"]["grids"] = {**METHODS["grids"], **merge.get("grids", {})}
    return parse_bench_config(data)


@pytest.fixture(scope="module")
def run(tiny_bert, tiny_tasks, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-stats")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPLICE_CACHE", str(root / "cache"))
        cfg = _config(tiny_bert, tiny_tasks)
        yield cfg, run_bench(cfg, root / "out", progress=False), root


def test_rows_on_both_kinds(run):
    _, res, root = run
    assert res.failed == []
    for kind in ("full", "lora"):
        got = {(r.method, r.variant or (r.params or {}).get("variant")) for r in res.tables[kind]}
        for want in [
            ("fisher", "default"),
            ("regmean", "default"),
            ("regmean", "tuned"),
            ("regmean++", "default"),
            ("fisher_graft", "tuned"),
            ("fw_merging", "hard"),
            ("fw_merging", "soft"),
        ]:
            assert want in got, (kind, want)
        for r in res.tables[kind]:
            if r.method in METHODS["params"]:
                assert r.merge_seconds >= 0 and r.peak_memory_mb is not None  # (rounded to 0.01 s)
                assert "train examples per task" in r.note
    text = (root / "out" / "results.json").read_text()
    assert '"peak_memory_mb"' in text
    fw = [r for r in res.tables["lora"] if r.method == "fw_merging"]
    assert all("picks per iteration" in r.note for r in fw)
    # one cached file per expert and statistic; fisher_graft reused fisher's
    stats = sorted(p.name.split("-")[0] for p in (root / "cache" / "bench" / "stats").iterdir())
    assert stats == ["fisher"] * 4 + ["gram"] * 4


def _evaluator(cfg, tiny_tasks):
    from splice.bench.backbone import prepare_base
    from splice.bench.evaluate import Evaluator
    from splice.bench.tasks import prepare_task

    tasks = [prepare_task(str(p), cfg.data) for p in tiny_tasks]
    base = prepare_base(cfg.model, cfg.training.seed)
    for t in tasks:
        base.fresh_model(t)
    return Evaluator(base, tasks, cfg.training.max_length, cfg.eval_batch_size), base


def _pool(res, kind):
    from splice.bench.backbone import load_heads
    from splice.bench.experts import Expert

    pool = []
    for name, e in res.experts[kind].items():
        folder = Path(e.folder)
        meta = __import__("json").loads((folder / "meta.json").read_text())
        pool.append(Expert(kind, [name], folder, load_heads(folder / "heads.safetensors"), meta))
    return pool


def test_regmean_row_is_the_library_merge_of_the_cached_grams(run, tiny_tasks):
    """The LoRA RegMean rows (α 0.9 default, α 0.5 tuned) are `merge_with_statistics` on the
    experts' backbones and the Gram files in the cache, scored on test."""
    from splice.merge.data_merge import merge_with_statistics

    cfg, res, root = run
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPLICE_CACHE", str(root / "cache"))
        ev, _ = _evaluator(cfg, tiny_tasks)
        pool = _pool(res, "lora")
        states = [load_file(str(e.folder / "model.safetensors")) for e in pool]
        grams = [
            next((root / "cache" / "bench" / "stats").glob(f"gram-{e.folder.name}-*")) for e in pool
        ]
        heads = {e.tasks[0]: e.heads[e.tasks[0]] for e in pool}
        rows = {r.params["alpha"]: r for r in res.tables["lora"] if r.method == "regmean"}
        for alpha, row in rows.items():
            merged = merge_with_statistics("regmean", states, grams, alpha=alpha)
            merged = {k: v.float() for k, v in merged.items()}
            assert ev.evaluate(merged, heads, "test") == row.test
        linear = next(r for r in res.tables["lora"] if r.method == "linear")
        assert rows[0.9].test != linear.test  # the Grams matter on these experts


def test_equal_fishers_give_the_average(run, tiny_tasks, tmp_path, monkeypatch):
    """With every Fisher equal (all ones), the bench's fisher merge is the plain average
    of the expert backbones; with the collected Fishers it is not."""
    import splice.merge.data_stats as data_stats
    from splice.bench.stat_merging import StatMerger

    cfg, res, _ = run
    monkeypatch.setenv("SPLICE_CACHE", str(tmp_path / "cache"))
    ev, base = _evaluator(cfg, tiny_tasks)
    pool = _pool(res, "lora")
    (p,) = select_methods(["fisher"], 2, params={"fisher": {"examples": 8}})[0]
    states = [load_file(str(e.folder / "model.safetensors")) for e in pool]
    mean = {k: (states[0][k] + states[1][k]) / 2 for k in states[0]}
    real = StatMerger(ev, p, pool, base.folder).merge(p.params)[0]
    ones = lambda model, batches, loss, per_example: {  # noqa: E731
        n: torch.ones_like(t) for n, t in model.named_parameters()
    }
    monkeypatch.setattr(data_stats, "collect_fisher", ones)
    monkeypatch.setenv("SPLICE_CACHE", str(tmp_path / "cache2"))
    merged, secs = StatMerger(ev, p, pool, base.folder).merge(p.params)
    assert secs > 0
    for k, v in mean.items():
        torch.testing.assert_close(merged[k], v, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(real[k], mean[k], atol=1e-4) for k in mean)


def test_rerun_reads_the_statistics_from_the_cache(run, tiny_bert, tiny_tasks, monkeypatch):
    """A second run with the same cache collects nothing (the collectors would raise) and
    gives the same fisher / regmean rows."""
    import splice.merge.data_stats as data_stats

    _, res, root = run

    def refuse(*a, **k):
        raise AssertionError("statistics collected again")

    monkeypatch.setattr(data_stats, "collect_fisher", refuse)
    monkeypatch.setattr(data_stats, "collect_gram", refuse)
    monkeypatch.setenv("SPLICE_CACHE", str(root / "cache"))
    cfg = _config(tiny_bert, tiny_tasks, methods=["fisher", "regmean"], sweep=False)
    again = run_bench(cfg, root / "out2", progress=False)
    assert again.failed == []
    for kind in ("full", "lora"):
        first = {
            r.method: r.test
            for r in res.tables[kind]
            if r.method in ("fisher", "regmean") and r.variant == "default"
        }
        rows = [r for r in again.tables[kind] if r.group == "merged"]
        assert {r.method: r.test for r in rows} == first
        assert all("2/2 from the cache" in r.note for r in rows)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"params": {"regmean": {"alpah": 0.5}}}, "did you mean 'alpha'"),
        ({"params": {"regmean": {"alpha": 1.5}}}, "alpha"),
        ({"params": {"fisher": {"examples": 0}}}, "examples"),
        ({"params": {"fw_merging": {"variant": ["hrad"]}}}, "variant"),
        ({"grids": {"fisher": {"floor": [0.1]}}}, "fisher has no sweep"),
        ({"grids": {"regmean": {"lambda": [0.1]}}}, "regmean sweeps alpha"),
        ({"grids": {"regmean": {"alpha": [0.5, 2.0]}}}, "alpha"),
    ],
)
def test_settings_errors_before_any_training(kw, match):
    with pytest.raises(SpliceError, match=match):
        select_methods(["fisher", "regmean", "fw_merging"], 2, **kw)


def test_planned_only_when_named():
    planned, skipped = select_methods("all", 3)
    assert not any(p.statistics is not None for p in planned)
    assert {"fisher", "regmean", "fisher_graft"} <= {s.name for s in skipped}
    planned, _ = select_methods(["regmean", "fisher_graft", "fw_merging", "regmean++"], 3)
    by = {p.name: p for p in planned}
    assert by["regmean"].sweep == ("alpha", [0.1, 0.5, 0.9, 1.0])
    assert by["regmean"].params == {"alpha": 0.9}
    assert by["regmean"].statistics == {"examples": 256, "batch_size": 16, "seed": 0}
    assert by["fisher_graft"].params == {"density": 0.2, "lambda": 1.0}
    assert by["fisher_graft"].sweep == ("lambda", [0.3, 0.5, 0.7, 1.0])
    assert by["fw_merging"].sweep is None and by["fw_merging"].params["variant"] == [
        "hard",
        "soft",
    ]


def test_no_train_data_and_mismatched_heads_are_errors(run, tiny_tasks):
    import dataclasses

    from splice.bench.stat_merging import check_heads, check_stat_data

    cfg, res, root = run
    planned, _ = select_methods(["regmean"], 2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPLICE_CACHE", str(root / "cache"))
        ev, _ = _evaluator(cfg, tiny_tasks)
        pool = _pool(res, "lora")
    tasks = list(ev.tasks.values())
    empty = dataclasses.replace(
        tasks[0], parts={**tasks[0].parts, "train": tasks[0].parts["train"].subset([])}
    )
    with pytest.raises(SpliceError, match="task sentiment has no training examples"):
        check_stat_data(planned, [empty, tasks[1]])
    check_stat_data(planned, tasks)
    check_stat_data(select_methods(["linear"], 2)[0], [empty, tasks[1]])  # no data needed
    swapped = [dataclasses.replace(pool[0], heads={"sentiment": pool[1].heads["topic"]})]
    with pytest.raises(SpliceError, match="label set differs"):
        check_heads(ev, swapped)
