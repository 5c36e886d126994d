"""`splice bench` on a causal-LM pool (`splice.bench.lm_run`) with the tiny Llama."""

from __future__ import annotations

import json
import math

import pytest
from bench_test_util import tiny_lm_config

from splice.bench import parse_bench_config, run_bench
from splice.bench.lm_evaluate import normalized_loss
from splice.bench.lm_run import is_causal_lm
from splice.errors import SpliceError


def _cfg(model, tasks, **over):
    return parse_bench_config(tiny_lm_config(model, tasks, **over))


def test_detects_a_causal_lm(tiny_lm_pool, tiny_bert):
    assert is_causal_lm(str(tiny_lm_pool[0]))
    assert not is_causal_lm(str(tiny_bert))
    assert not is_causal_lm("/no/such/model")  # left to the classifier bench's error


def test_lm_pool_end_to_end(tiny_lm_pool, bench_cache, tmp_path):
    model, tasks = tiny_lm_pool
    out = tmp_path / "out"
    res = run_bench(_cfg(model, tasks, compose=["oracle"]), out)
    data = json.loads((out / "results.json").read_text())
    assert (out / "results.md").read_text().startswith("# splice bench: causal-LM pool")
    names = ["abc", "digits", "color"]
    assert {n: data["tasks"][n]["kind"] for n in names} == {
        "abc": "lm",
        "digits": "lm",
        "color": "exact_match",
    }
    skipped = {s["name"]: s["reason"] for s in data["skipped"]}
    assert "linear probe" in skipped and "oracle" in skipped
    assert "multi-task" not in skipped  # run (the default), test_lm_multitask_baseline
    pre = res.pretrained
    for kind in ("full", "lora"):
        rows = {(r.method, r.variant): r for r in res.rows if r.kind == kind}
        experts = rows[("experts", None)]
        for n in ("abc", "digits"):  # the experts learned their domain
            assert experts.test[n]["loss"] < pre[n]["loss"] - 0.1
            assert experts.normalized[n] == pytest.approx(1.0)
            assert rows[("pretrained", None)].normalized[n] == pytest.approx(0.0)
            assert experts.test[n]["perplexity"] == pytest.approx(
                math.exp(experts.test[n]["loss"]), rel=1e-6
            )
        # λ = 0: the merge is the pretrained model, through the engine and back
        ta0 = rows[("task_arithmetic", "default")]
        assert ta0.params == {"lambda": 0.0}
        for n in names:
            for metric, v in pre[n].items():
                assert ta0.test[n][metric] == pytest.approx(v, rel=1e-5, abs=1e-6)
        lin = rows[("linear", "default")]
        for n in ("abc", "digits"):
            want = normalized_loss(pre[n]["loss"], lin.test[n]["loss"], experts.test[n]["loss"])
            assert lin.normalized[n] == pytest.approx(want)
        assert ("task_arithmetic", "tuned") in rows
        assert (("lora:svd", "default") in rows) == (kind == "lora")  # LoRA experts only
    # the second run reuses every expert
    again = run_bench(_cfg(model, tasks), tmp_path / "out2")
    assert all(e["cached"] for k in again.experts.values() for e in k.values())


def test_lora_targets_must_exist(tiny_lm_pool, bench_cache, tmp_path):
    model, tasks = tiny_lm_pool
    cfg = _cfg(model, tasks, kinds=["lora"], lora={"target_modules": ["query", "value"]})
    with pytest.raises(SpliceError, match=r"q_proj"):
        run_bench(cfg, tmp_path / "o")


def test_unknown_lm_task_is_a_clear_error(tiny_lm_pool, bench_cache, tmp_path):
    model, tasks = tiny_lm_pool
    with pytest.raises(SpliceError, match=r"wordnet_glosses"):
        run_bench(_cfg(model, [tasks[0], "wordnet_gloss"]), tmp_path / "o")


def test_cli_prints_the_lm_table(tiny_lm_pool, bench_cache, tmp_path, capsys):
    import yaml

    from splice.cli import main

    model, tasks = tiny_lm_pool
    cfg = _cfg(model, tasks[:2], kinds=["lora"]).model_dump(mode="json")
    cfg["merge"] = {"methods": ["linear"]}
    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["bench", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "causal-LM pool" in printed and "| linear (default) |" in printed


def test_lm_multitask_baseline(tiny_lm_pool, bench_cache, tmp_path, monkeypatch):
    """The multi-task model: one full fine-tune on the union of the train parts (48 + 48 +
    24 = 120 rows, 2 epochs of ceil(120 / 8) = 15 batches: 30 steps, the experts' 12 + 12 +
    6), cached, a "multi-task" row in both tables equal to a direct evaluation of the cached
    model and normalized against each kind's experts; a rerun trains nothing."""
    import torch
    from transformers import AutoModelForCausalLM

    import splice.train.data as train_data
    import splice.train.loop as train_loop
    from splice.bench.config import DataSizes
    from splice.bench.lm_evaluate import LMEvaluator
    from splice.bench.lm_tasks import prepare_lm_task
    from splice.train.models import load_for_task

    model, tasks = tiny_lm_pool
    cfg = _cfg(model, tasks, merge={"methods": ["linear"]})
    seen = []  # (rows, shuffle seed) of every training epoch
    real_batches = train_data.lm_batches

    def recording(examples, tok, batch_size, max_length, shuffle_seed=None):
        if shuffle_seed is not None:
            seen.append((list(examples), shuffle_seed))
        return real_batches(examples, tok, batch_size, max_length, shuffle_seed)

    monkeypatch.setattr(train_data, "lm_batches", recording)
    res = run_bench(cfg, tmp_path / "out")
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert "multi-task" not in {s["name"] for s in data["skipped"]}
    parts = [prepare_lm_task(t, DataSizes()).parts["train"] for t in tasks]
    assert [len(p) for p in parts] == [48, 48, 24]
    mt = data["experts"]["multitask"]
    assert (mt["steps"], mt["train_examples"], mt["cached"]) == (30, 120, False)
    assert mt["train_examples_per_task"] == {"abc": 48, "digits": 48, "color": 24}
    union = [(rows, seed) for rows, seed in seen if len(rows) == 120]
    # one shuffle per epoch, seed training.seed + epoch (`fit` opens epoch 2's stream, then
    # stops at its 30 steps: 2 epochs of 15 batches)
    assert [seed for _, seed in union] == [0, 1, 2]
    assert all(rows == [e for p in parts for e in p] for rows, _ in union)
    # the row is the cached model evaluated directly (transformers' load, its own evaluator)
    lm = AutoModelForCausalLM.from_pretrained(mt["folder"], dtype=torch.float32)
    tok = load_for_task(str(model), "causal_lm")[1]
    t = cfg.training
    task_data = [prepare_lm_task(x, cfg.data) for x in tasks]
    direct = LMEvaluator(lm, tok, task_data, t.max_length, cfg.eval_batch_size, 3).evaluate(
        None, "test"
    )
    pre = res.pretrained
    for n in ("abc", "digits"):
        assert direct[n]["loss"] < pre[n]["loss"] - 0.1  # it learned both domains
    expert_losses = set()
    for kind in ("full", "lora"):
        rows = [r for r in res.rows if r.kind == kind]
        assert [r.method for r in rows[:3]] == ["pretrained", "experts", "multi-task"]
        experts, row = rows[1], rows[2]
        assert row.group == "baseline" and "120 examples, 30 steps" in row.note
        for n, metrics in direct.items():
            assert row.test[n] == pytest.approx(metrics, rel=1e-6)
        for n in ("abc", "digits"):
            gain = pre[n]["loss"] - experts.test[n]["loss"]
            want = (pre[n]["loss"] - direct[n]["loss"]) / gain
            assert row.normalized[n] == pytest.approx(want, rel=1e-6)
            expert_losses.add(experts.test[n]["loss"])
        em = experts.test["color"]["exact_match"]
        if em > 0:
            want_em = direct["color"]["exact_match"] / em
            assert row.normalized["color"] == pytest.approx(want_em)
        else:  # undefined: the expert scores 0
            assert row.normalized["color"] is None
    assert len(expert_losses) == 4  # each kind's row is normalized by its own experts
    assert mt["test"] == res.multitask["test"] == rows[2].test
    md = (tmp_path / "out" / "results.md").read_text()
    assert md.count("| multi-task |") == 2
    assert len(list((bench_cache / "bench" / "lm-experts").iterdir())) == 7  # 6 experts + 1

    def no_training(*a, **k):
        raise AssertionError("a rerun trained a model")

    monkeypatch.setattr(train_loop, "fit", no_training)
    again = run_bench(cfg, tmp_path / "out2")
    assert again.multitask["cached"] and again.multitask["folder"] == mt["folder"]
    assert again.multitask["test"] == res.multitask["test"]
