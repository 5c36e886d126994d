"""One end-to-end `splice bench` run on a tiny BERT and two synthetic tasks (seconds)."""

from __future__ import annotations

import json

import pytest
import torch
from bench_test_util import tiny_config
from safetensors.torch import load_file

from splice.bench import parse_bench_config, run_bench


@pytest.fixture(scope="module")
def run(tiny_bert, tiny_tasks, tmp_path_factory):
    """One run for the module (its cache stays set for the module's tests)."""
    root = tmp_path_factory.mktemp("bench-e2e")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPLICE_CACHE", str(root / "cache"))
        cfg = parse_bench_config(tiny_config(tiny_bert, tiny_tasks))
        out = root / "out"
        yield cfg, out, run_bench(cfg, out, progress=False)


def test_outputs_and_experts(run):
    _, out, res = run
    for name in (
        "results.json",
        "results.md",
        "accuracy_by_method.png",
        "accuracy_vs_coefficient.png",
    ):
        assert (out / name).is_file(), name
    assert (out / "accuracy_by_method.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((out / "results.json").read_text())
    assert saved["tasks"]["sentiment"]["classes"] == 2
    assert saved["tasks"]["topic"]["classes"] == 3
    for kind in ("full", "lora"):
        for task in ("sentiment", "topic"):
            e = res.experts[kind][task]
            assert e.test >= 0.9, (kind, task, e)  # keyword tasks: clearly learned
            assert e.margin_over_chance == pytest.approx(e.test - e.chance)
            assert not e.cached
            assert saved["experts"][kind][task] == e.to_json()
    assert res.skipped == []
    assert saved == json.loads(json.dumps(res.to_json(), default=str))


def test_table_values(run):
    _, _, res = run
    for kind, rows in res.tables.items():
        experts = {t: res.experts[kind][t].test for t in ("sentiment", "topic")}
        names = [r.method for r in rows]
        assert names[:2] == ["experts", "pretrained + expert heads"]
        assert {"linear probe", "multi-task"} <= set(names)
        for r in rows:
            acc = r.test
            assert r.score.avg == pytest.approx((acc["sentiment"] + acc["topic"]) / 2)
            want = (acc["sentiment"] / experts["sentiment"] + acc["topic"] / experts["topic"]) / 2
            assert r.score.avg_normalized == pytest.approx(want)
        assert rows[0].score.avg_normalized == pytest.approx(1.0)
        merged = [r.score.avg_normalized for r in rows if r.group == "merged"]
        assert merged == sorted(merged, reverse=True)
        assert len(merged) == 5  # linear + (default, tuned) for the two swept methods


def test_sweep_picks_best_validation_point(run):
    _, _, res = run
    sweeps = {(s.kind, s.method): s for s in res.sweeps}
    assert set(sweeps) == {(k, m) for k in ("full", "lora") for m in ("task_arithmetic", "ties")}
    for s in sweeps.values():
        assert [p.value for p in s.points] == (
            [0.5, 1.0] if s.method == "task_arithmetic" else [0.6, 1.0]
        )
        best = max(s.points, key=lambda p: p.avg)
        assert s.best == best.value
        assert s.at_grid_edge  # two points: the best is always an end
        assert s.default == 1.0


def test_linear_row_is_the_average_backbone(run, tiny_bert, tiny_tasks):
    """The merged row equals evaluating the hand-averaged expert backbones."""
    from splice.bench.backbone import prepare_base
    from splice.bench.evaluate import Evaluator
    from splice.bench.tasks import prepare_task

    cfg, _, res = run
    tasks = [prepare_task(str(p), cfg.data) for p in tiny_tasks]
    base = prepare_base(cfg.model, cfg.training.seed)
    for t in tasks:
        base.fresh_model(t)
    ev = Evaluator(base, tasks, cfg.training.max_length, cfg.eval_batch_size)
    from pathlib import Path

    from splice.bench.backbone import load_heads

    experts = [Path(res.experts["full"][t.name].folder) for t in tasks]
    states = [load_file(str(f / "model.safetensors")) for f in experts]
    avg = {
        k: torch.stack([s[k] for s in states]).mean(0)
        if states[0][k].is_floating_point()
        else states[0][k]
        for k in states[0]
    }
    heads = {t.name: load_heads(f / "heads.safetensors")[t.name] for t, f in zip(tasks, experts)}
    want = ev.evaluate(avg, heads, "test")
    row = next(r for r in res.tables["full"] if r.method == "linear")
    assert row.test == pytest.approx(want, abs=1e-9)


def test_second_run_reuses_the_experts(run, tmp_path):
    cfg, _, first = run
    again = run_bench(cfg, tmp_path / "out2", progress=False)
    for kind in ("full", "lora"):
        for task, e in again.experts[kind].items():
            assert e.cached
            assert e.test == first.experts[kind][task].test
    assert again.multitask.cached


def test_lora_native_methods_are_rows_of_the_lora_table(run, tmp_path):
    """LoRA experts kept low-rank: `lora:concat` merges their saved PEFT adapters (exact:
    base + Σ ΔW_i, the same backbone as Task Arithmetic on the folded experts), and LoRA-native
    methods run as rows of the LoRA table only, measured like the others."""
    from pathlib import Path

    from splice.bench.backbone import prepare_base
    from splice.bench.experts import ADAPTER_DIR
    from splice.bench.merging import merge_backbones

    cfg, _, res = run
    experts = [Path(e.folder) for e in res.experts["lora"].values()]
    assert all((f / ADAPTER_DIR / "adapter_config.json").is_file() for f in experts)
    base = prepare_base(cfg.model, cfg.training.seed).folder
    low_rank, _ = merge_backbones("lora:concat", {}, base, experts)
    dense, _ = merge_backbones("task_arithmetic", {}, base, experts)
    assert set(low_rank) == set(dense)
    moved = [
        k for k in dense if not torch.equal(dense[k], load_file(base / "model.safetensors")[k])
    ]
    assert any("query" in k for k in moved)  # the LoRA targets moved
    for k in dense:
        torch.testing.assert_close(low_rank[k], dense[k], atol=1e-5, rtol=0, msg=k)
    lora_only = {
        **cfg.model_dump(),
        "kinds": ["lora"],
        "baselines": {"probe": False, "multitask": False},
    }
    lora_only["merge"] = {"methods": ["lora:svd", "lora:ties"], "sweep": False}
    again = run_bench(parse_bench_config(lora_only), tmp_path / "out", progress=False)
    rows = {r.method: r for r in again.tables["lora"] if r.group == "merged"}
    assert set(rows) == {"lora:svd", "lora:ties"} and "full" not in again.tables
    assert rows["lora:ties"].params == {"density": 0.2}
    assert all(m.low_rank for m in again.methods)
    for r in rows.values():
        assert set(r.test) == {"sentiment", "topic"} and r.merge_seconds >= 0


COMPOSE_TASKS = ("sentiment", "topic")


def _rows(res):
    return {r.method: r for r in res.tables["lora"]}


def test_composition_rows_oracle_equals_the_experts(run):
    """Default composition rows on the LoRA experts: oracle routing (each example with its
    own task's adapter) scores exactly each expert on its own task."""
    cfg, out, res = run
    assert cfg.compose is None and cfg.compose_rows == ["oracle", "retrieval"]
    rows = _rows(res)
    assert [r.group for r in res.tables["lora"]][-2:] == ["composed", "composed"]
    oracle = rows["oracle routing"]
    for task in COMPOSE_TASKS:  # the expert's backbone is its adapter folded into the base
        assert oracle.test[task] == res.experts["lora"][task].test
    assert oracle.score.avg_normalized == pytest.approx(1.0)
    retrieval = rows["retrieval routing"]
    assert retrieval.params == {"k": 2, "temperature": 0.1}
    assert set(retrieval.routing) == set(COMPOSE_TASKS)
    assert all(0 <= v <= 1 for v in retrieval.routing.values())
    for r in (oracle, retrieval):
        assert r.inference_cost > 0
    assert rows["linear"].inference_cost is None
    assert "oracle routing" not in {r.method for r in res.tables["full"]}
    text = (out / "results.md").read_text()
    assert "| rel. cost |" in text
    assert "share of test examples whose top-1 expert" in text


def test_uniform_retrieval_is_the_linear_merge(run, tmp_path):
    """Both experts at weight 1/2 in every row: y = f(x) + ½ΔW₁x + ½ΔW₂x, the forward of
    the backbone W + mean ΔW, which is the linear merge of the folded LoRA experts."""
    cfg, _, _ = run
    data = {**cfg.model_dump(), "kinds": ["lora"], "compose": ["retrieval"]}
    data["baselines"] = {"probe": False, "multitask": False}
    data["merge"] = {"methods": ["linear"], "sweep": False}
    data["retrieval"] = {"k": 2, "temperature": 1e9}
    again = run_bench(parse_bench_config(data), tmp_path / "out", progress=False)
    rows = _rows(again)
    assert rows["retrieval routing"].test == rows["linear"].test
    assert "oracle routing" not in rows


def test_separated_centroids_route_like_the_oracle(run, monkeypatch):
    """Embeddings that name each example's task and one-hot centroids: the top-1 expert is
    always the example's own, so k=1 retrieval is the oracle, task for task."""
    from splice.bench.backbone import prepare_base
    from splice.bench.evaluate import Evaluator
    from splice.bench.experts import get_expert
    from splice.bench.routing import RoutedModel
    from splice.bench.tasks import prepare_task

    cfg, _, res = run
    tasks = [prepare_task(t, cfg.data) for t in cfg.tasks]
    base = prepare_base(cfg.model, cfg.training.seed)
    pool = {t.name: get_expert(base, [t], "lora", cfg, progress=False) for t in tasks}
    assert all(e.cached for e in pool.values())
    ev = Evaluator(base, tasks, cfg.training.max_length, cfg.eval_batch_size)
    routed = RoutedModel(ev, pool)
    heads = {name: e.heads[name] for name, e in pool.items()}
    oracle = routed.oracle(heads)
    for i, task in enumerate(heads):

        def names_the_task(self, batch, i=i):
            return torch.eye(2)[[i] * batch["input_ids"].shape[0]]

        monkeypatch.setattr(RoutedModel, "embed", names_the_task)
        got = routed.retrieval({task: heads[task]}, torch.eye(2), k=1, temperature=0.1)
        assert got.routing == {task: 1.0}
        assert got.test[task] == oracle.test[task] == res.experts["lora"][task].test


def test_lorahub_with_own_expert_weights_is_the_oracle(run, tmp_path, monkeypatch):
    """LoraHub's composition with weight 1 on the task's own expert and 0 elsewhere is that
    expert's LoRA (A = A_own, B = s_own B_own at scale 1): its row equals the oracle's."""
    import types

    import splice.bench.routing as routing

    cfg, _, _ = run
    seen = []

    def own_expert(am, experts, batches, *, budget, seed):
        (batch,) = batches
        seen.append((len(batch["labels"]), budget))
        head = am.model.classifier  # the task's head is in place: find which by its size
        weights = [0.0, 0.0]
        weights[0 if head.out_features == 2 else 1] = 1.0
        return types.SimpleNamespace(weights=weights)

    monkeypatch.setattr(routing, "lorahub_search", own_expert)
    data = {**cfg.model_dump(), "kinds": ["lora"], "compose": ["oracle", "lorahub"]}
    data["baselines"] = {"probe": False, "multitask": False}
    data["merge"] = {"methods": ["linear"], "sweep": False}
    data["lorahub"] = {"examples": 8, "budget": 3}
    again = run_bench(parse_bench_config(data), tmp_path / "out", progress=False)
    rows = _rows(again)
    assert seen == [(8, 3), (8, 3)]
    assert rows["lorahub"].test == rows["oracle routing"].test
    assert rows["lorahub"].weights == {
        "sentiment": {"sentiment": 1.0, "topic": 0.0},
        "topic": {"sentiment": 0.0, "topic": 1.0},
    }
    assert rows["lorahub"].params == {"examples": 8, "budget": 3}


def test_lorahub_search_runs_on_the_classifier(run):
    """The real search (a tiny budget) on each task's validation sample with its head."""
    from splice.bench.backbone import prepare_base
    from splice.bench.evaluate import Evaluator
    from splice.bench.experts import get_expert
    from splice.bench.routing import RoutedModel
    from splice.bench.tasks import prepare_task

    cfg, _, _ = run
    tasks = [prepare_task(t, cfg.data) for t in cfg.tasks]
    base = prepare_base(cfg.model, cfg.training.seed)
    pool = {t.name: get_expert(base, [t], "lora", cfg, progress=False) for t in tasks}
    ev = Evaluator(base, tasks, cfg.training.max_length, cfg.eval_batch_size)
    routed = RoutedModel(ev, pool)
    got = routed.lorahub({n: e.heads[n] for n, e in pool.items()}, examples=4, budget=2, seed=0)
    assert set(got.weights) == set(COMPOSE_TASKS)
    for w in got.weights.values():
        assert set(w) == set(COMPOSE_TASKS) and all(-1.5 <= v <= 1.5 for v in w.values())
    assert all(0 <= a <= 1 for a in got.test.values()) and got.seconds > 0
    assert "lorahub_search" not in routed.am.configs  # the composed adapter was removed
