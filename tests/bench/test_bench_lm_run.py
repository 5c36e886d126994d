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
    assert "linear probe" in skipped and "multi-task" in skipped and "oracle" in skipped
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
