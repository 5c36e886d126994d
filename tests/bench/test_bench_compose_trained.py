"""The trained composition rows of `splice bench` (gate, fusion) on the tiny BERT's LoRA experts."""

from __future__ import annotations

import pytest
import torch
from bench_test_util import tiny_config

from splice.bench import parse_bench_config, run_bench
from splice.bench.config import BenchConfigError

TASKS = ("sentiment", "topic")


def _config(tiny_bert, tiny_tasks, **over):
    data = tiny_config(tiny_bert, tiny_tasks, kinds=["lora"], merge={"sweep": False})
    data["merge"]["methods"] = ["linear"]
    data["baselines"] = {"probe": False, "multitask": False}
    data["compose"] = ["oracle", "gate", "fusion"]
    data["gate"] = {"levels": ["sequence", "token"], "epochs": 0.5}
    data["fusion"] = {"epochs": 0.5, "lr": 1e-3}
    data.update(over)
    return parse_bench_config(data)


@pytest.fixture(scope="module")
def run(tiny_bert, tiny_tasks, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-trained")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPLICE_CACHE", str(root / "cache"))
        cfg = _config(tiny_bert, tiny_tasks)
        yield cfg, root, run_bench(cfg, root / "out", progress=False)


def _rows(res):
    return {r.method: r for r in res.tables["lora"]}


def _routed(cfg):
    """The bench's routed model over the (cached) LoRA experts, and the experts' heads."""
    from splice.bench.backbone import prepare_base
    from splice.bench.evaluate import Evaluator
    from splice.bench.experts import get_expert
    from splice.bench.routing import RoutedModel
    from splice.bench.tasks import prepare_task

    tasks = [prepare_task(t, cfg.data) for t in cfg.tasks]
    base = prepare_base(cfg.model, cfg.training.seed)
    pool = {t.name: get_expert(base, [t], "lora", cfg, progress=False) for t in tasks}
    assert all(e.cached for e in pool.values())
    ev = Evaluator(base, tasks, cfg.training.max_length, cfg.eval_batch_size)
    return RoutedModel(ev, pool), pool, {n: e.heads[n] for n, e in pool.items()}


def test_rows_appear_with_cost_and_notes(run):
    _, root, res = run
    rows = _rows(res)
    for name in ("gate (sequence)", "gate (token)", "fusion"):
        r = rows[name]
        assert r.group == "composed" and set(r.test) == set(TASKS)
        assert all(0 <= a <= 1 for a in r.test.values())
        assert r.inference_cost > 0
        assert "trained now" in r.note or "0 of 2 from the cache" in r.note
    assert rows["gate (sequence)"].params == {"top_k": 2, "balance_coef": 0.01}
    assert set(rows["gate (sequence)"].routing) == set(TASKS)
    assert rows["gate (token)"].routing is None  # a token gate has no per-example top-1
    assert rows["fusion"].params == {"lr": 1e-3}
    text = (root / "out" / "results.md").read_text()
    assert "| gate (sequence) |" in text and "| fusion |" in text


def test_one_hot_gate_is_the_oracle(run):
    """A sequence gate with W = 0 and bias 1e4 on the true task's expert: softmax is exactly
    one-hot, so every layer runs f(x) + 1·(f_own(x) − f(x)) + 0·(...): the gate row is oracle
    routing, task for task (features up to float rounding)."""
    from splice.bench.gating import gate_result, get_gate

    cfg, _, _ = run
    routed, pool, heads = _routed(cfg)
    mixture, meta = get_gate(routed, pool, heads, cfg, "sequence", progress=False)
    assert meta["cached"]
    oracle = routed.oracle(heads)
    gate = mixture.gates["sequence"]
    for i, task in enumerate(heads):
        with torch.no_grad():
            gate.weight.zero_()
            gate.bias.copy_(torch.eye(2)[i] * 1e4)
        got = gate_result(routed, mixture, {task: heads[task]})
        assert got.routing == {task: 1.0}
        assert got.test[task] == oracle.test[task]
        b = routed.ev.encoded[(task, "test")].batches[0]
        own = routed.features(b, [routed.adapter[task]] * b["input_ids"].shape[0])
        torch.testing.assert_close(routed.capture(lambda b=b: mixture(**b)), own)
        other = routed.features(b, [routed.adapter[TASKS[1 - i]]] * b["input_ids"].shape[0])
        assert not torch.allclose(own, other, atol=1e-4)  # the check can tell experts apart


def test_fusion_with_uniform_attention_is_the_adapters_average(run):
    """Q = K = 0 gives p_i = 1/N at every layer; with V = I the fused layer is
    y + ½ΔW₁x + ½ΔW₂x, the uniform mixed-adapter forward."""
    from splice.bench.fusing import fusion_result, get_fusion

    cfg, _, res = run
    routed, pool, heads = _routed(cfg)
    task = TASKS[0]
    block, head, meta = get_fusion(routed, pool, heads, cfg, task, progress=False)
    assert meta["cached"]
    again = fusion_result(routed, {task: (block, head)})
    assert again.test[task] == _rows(res)["fusion"].test[task]  # the cached fusion, reloaded
    fusion = routed.am.fusions[block.name]
    with torch.no_grad():
        for layer in fusion.layers:
            for proj in (layer.query, layer.key):
                proj.weight.zero_()
                proj.bias.zero_()
            layer.value.weight.copy_(torch.eye(layer.value.weight.shape[0]))
    b = routed.ev.encoded[(task, "test")].batches[0]
    rows = b["input_ids"].shape[0]
    uniform = routed.features(b, [{n: 0.5 for n in routed.adapter.values()}] * rows)
    routed.am.set_active(block)
    try:
        fused = routed.features(b, None)
    finally:
        routed.am.set_active([])
    torch.testing.assert_close(fused, uniform, atol=1e-5, rtol=1e-5)
    own = routed.features(b, [routed.adapter[task]] * rows)
    assert not torch.allclose(fused, own, atol=1e-4)  # the average is not one adapter


def test_rerun_reads_the_cache_and_settings_are_keys(run, monkeypatch, tmp_path):
    """A second run trains nothing (fit would fail) and gives the same rows; another balance
    coefficient is another gate (trained anew)."""
    import splice.train.loop as loop

    cfg, root, res = run

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    with monkeypatch.context() as mp:
        mp.setattr(loop, "fit", no_training)
        again = run_bench(cfg, tmp_path / "again", progress=False)
    before, after = _rows(res), _rows(again)
    for name in ("gate (sequence)", "gate (token)", "fusion"):
        assert after[name].test == before[name].test
    assert "from the cache" in after["gate (token)"].note
    assert "2 of 2 from the cache" in after["fusion"].note
    gates = root / "cache" / "bench" / "gates"
    n = len(list(gates.iterdir()))
    data = cfg.model_dump()
    data["compose"] = ["gate"]
    data["gate"] = {**data["gate"], "levels": ["sequence"], "balance_coef": 0.5}
    run_bench(parse_bench_config(data), tmp_path / "other", progress=False)
    assert len(list(gates.iterdir())) == n + 1


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"kinds": ["full"], "compose": ["gate"]}, "compose the LoRA experts and there are none"),
        ({"kinds": ["full"], "compose": ["fusion"]}, "add lora to kinds"),
        ({"compose": ["gate"], "gate": {"top_k": 3}}, "top_k=3 but there are 2 LoRA experts"),
        ({"gate": {"levels": ["layer"]}}, "'gate.levels.0'"),
        ({"fusion": {"lr": 0}}, "'fusion.lr'"),
    ],
)
def test_config_errors(tiny_bert, tiny_tasks, over, message):
    with pytest.raises(BenchConfigError, match=message):
        _config(tiny_bert, tiny_tasks, **over)
