"""The ``twin_merging`` rows of `splice bench` (bench.twin) on the tiny BERT and two tasks."""

from __future__ import annotations

import pytest
import torch
from bench_test_util import FILLERS, SPECIAL, TASKS, tiny_config

from splice.bench import parse_bench_config, run_bench
from splice.bench.config import BenchConfigError
from splice.compose.twin_merging import TwinMerging


@pytest.fixture(scope="module")
def twin_run(tiny_bert, tiny_tasks, tmp_path_factory):
    """Task Arithmetic shared, the default rank ⌊32 · 0.1⌋ = 3 on the tiny 32-wide
    matrices, dense softmax weights from the trained router."""
    root = tmp_path_factory.mktemp("bench-twin")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPLICE_CACHE", str(root / "cache"))
        data = tiny_config(tiny_bert, tiny_tasks)
        data["merge"] = {"methods": ["task_arithmetic"], "sweep": False}
        data["baselines"] = {"probe": False, "multitask": False}
        data["compose"] = ["oracle", "twin_merging"]
        data["twin"] = {"epochs": 200, "lr": 2e-3, "batch_size": 16}
        cfg = parse_bench_config(data)
        yield root, cfg, run_bench(cfg, root / "out", progress=False)


def _row(res, kind):
    (row,) = [r for r in res.tables[kind] if r.method == "twin_merging"]
    return row


def test_twin_rows_for_every_kind(twin_run):
    from splice.bench.tasks import prepare_task

    _, cfg, res = twin_run
    for kind in ("full", "lora"):
        row = _row(res, kind)
        assert row.group == "composed"
        assert row.params == {"shared": "task_arithmetic", "fraction": 0.1}
        assert row.inference_cost is not None and row.inference_cost > 0
        assert set(row.routing) == {"sentiment", "topic"}
        assert all(0 <= v <= 1 for v in row.routing.values())
        n = sum(len(prepare_task(t, cfg.data).parts["train"].labels) for t in cfg.tasks)
        assert n > 75
        assert f"router MLP trained on {n} train examples" in row.note
    assert not res.failed


def _task_of_keywords(self, batch):
    """An oracle router for the tiny tasks: every example holds one keyword of its task
    (vocab: specials, fillers, then the sentiment keywords, then the topic ones)."""
    first = len(SPECIAL) + len(FILLERS)
    n_sentiment = sum(len(k) for k in TASKS["sentiment"].values())
    ids = batch["input_ids"]
    sentiment = ((ids >= first) & (ids < first + n_sentiment)).any(-1)
    return torch.stack([sentiment, ~sentiment], -1).float()


def test_full_rank_one_hot_twin_of_lora_experts_is_the_expert(twin_run, monkeypatch):
    """A LoRA expert differs from θ* in Linear weights only, so with the full-rank τ_t
    (rank 64 ≥ 32) and weight 1 on its own task the row is the expert, example for example."""
    root, cfg, res = twin_run
    monkeypatch.setenv("SPLICE_CACHE", str(root / "cache"))  # the module run's experts
    monkeypatch.setattr(TwinMerging, "weights", _task_of_keywords)
    data = {**cfg.model_dump(), "kinds": ["lora"], "compose": ["twin_merging"]}
    data["twin"] = {**data["twin"], "rank": 64, "epochs": 1}
    again = run_bench(parse_bench_config(data), root / "again", progress=False)
    row = _row(again, "lora")
    assert row.routing == {"sentiment": 1.0, "topic": 1.0}
    assert "keeps 100.0%" in row.note
    for task, acc in row.test.items():
        assert acc == res.experts["lora"][task].test


def test_twin_row_needs_no_lora_kind_but_other_routes_do(tiny_bert, tiny_tasks):
    data = tiny_config(tiny_bert, tiny_tasks)
    cfg = parse_bench_config({**data, "kinds": ["full"], "compose": ["twin_merging"]})
    assert cfg.compose_rows == ["twin_merging"]
    with pytest.raises(BenchConfigError, match="lora"):
        parse_bench_config({**data, "kinds": ["full"], "compose": ["oracle", "twin_merging"]})
    with pytest.raises(BenchConfigError, match=r"twin\.fraction"):
        parse_bench_config({**data, "twin": {"fraction": 1.5}})


def test_router_trained_on_the_validation_split(twin_run, monkeypatch):
    """``twin.router_split: validation`` (the paper's text) embeds every task's validation
    split for the router instead of its training split (the default)."""
    root, cfg, _ = twin_run
    monkeypatch.setenv("SPLICE_CACHE", str(root / "cache"))  # the module run's experts
    data = {**cfg.model_dump(), "kinds": ["lora"], "compose": ["twin_merging"]}
    data["twin"] = {**data["twin"], "router_split": "validation", "epochs": 1}
    again = run_bench(parse_bench_config(data), root / "validation-router", progress=False)
    assert "router MLP trained on 75 validation examples" in _row(again, "lora").note
    with pytest.raises(BenchConfigError, match="router_split"):
        parse_bench_config({**data, "twin": {"router_split": "test"}})


def test_router_on_every_layers_features(twin_run, monkeypatch):
    """``twin.router_features: layers`` embeds with every hidden state (`TwinMerging.embed`):
    the row names it in its settings and note; anything else is a config error."""
    root, cfg, _ = twin_run
    monkeypatch.setenv("SPLICE_CACHE", str(root / "cache"))  # the module run's experts
    data = {**cfg.model_dump(), "kinds": ["lora"], "compose": ["twin_merging"]}
    data["twin"] = {**data["twin"], "router_features": "layers", "epochs": 1}
    seen = []
    embed = TwinMerging.embed
    monkeypatch.setattr(TwinMerging, "embed", lambda self, b: seen.append(e := embed(self, b)) or e)
    row = _row(run_bench(parse_bench_config(data), root / "layers-router", progress=False), "lora")
    assert row.params == {"shared": "task_arithmetic", "fraction": 0.1, "router": "layers"}
    assert "from the shared model's mean-pooled hidden states of every layer" in row.note
    assert {e.shape[1] for e in seen} == {3 * 32}  # tiny BERT: embeddings + 2 layers, width 32
    with pytest.raises(BenchConfigError, match="router_features"):
        parse_bench_config({**data, "twin": {"router_features": "cls"}})
