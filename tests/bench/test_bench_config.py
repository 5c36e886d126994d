"""`splice bench` config: strict keys with suggestions, value checks, defaults."""

from __future__ import annotations

import pytest

from splice.bench.config import BenchConfigError, load_bench_config, parse_bench_config

MIN = {"tasks": ["a.csv", "b.csv"]}


def test_defaults():
    cfg = parse_bench_config(MIN)
    assert cfg.model == "minilm"
    assert cfg.kinds == ["full", "lora"]
    assert cfg.merge.methods == "core"
    assert cfg.data.train_per_class == 200 and cfg.data.test_max == 500
    assert cfg.lora.target_modules == ["query", "value"]
    assert cfg.precision == "auto"


@pytest.mark.parametrize(
    ("data", "where", "hint"),
    [
        ({**MIN, "kind": ["full"]}, "'kind'", "did you mean 'kinds'"),
        ({**MIN, "data": {"train_per_clas": 3}}, "'data.train_per_clas'", "'train_per_class'"),
        ({**MIN, "training": {"epoch": 1}}, "'training.epoch'", "'epochs'"),
        ({**MIN, "lora": {"rank": 4}}, "'lora.rank'", "unknown key"),
        ({**MIN, "merge": {"method": "all"}}, "'merge.method'", "'methods'"),
    ],
)
def test_unknown_keys_name_the_closest(data, where, hint):
    with pytest.raises(BenchConfigError) as e:
        parse_bench_config(data)
    assert where in str(e.value) and hint in str(e.value)


@pytest.mark.parametrize(
    ("data", "where"),
    [
        ({"tasks": ["only_one"]}, "'tasks'"),
        ({"tasks": ["a", "a"]}, "'tasks'"),
        ({**MIN, "kinds": ["qlora"]}, "'kinds.0'"),
        ({**MIN, "kinds": []}, "'kinds'"),
        ({**MIN, "full": {"lr": 0}}, "'full.lr'"),
        ({**MIN, "training": {"epochs": -1}}, "'training.epochs'"),
        ({**MIN, "data": {"test_max": 0}}, "'data.test_max'"),
        ({**MIN, "merge": {"methods": []}}, "'merge.methods'"),
        ({**MIN, "merge": {"methods": "some"}}, "'merge.methods'"),
        ({**MIN, "merge": {"grids": {"ties": {"lambda": [1], "density": [0.2]}}}}, "grids"),
        ({**MIN, "merge": {"grids": {"ties": {"lambda": []}}}}, "grids"),
        ({**MIN, "precision": "fp8"}, "'precision'"),
        ({"kinds": ["full"]}, "'tasks'"),  # required
    ],
)
def test_bad_values(data, where):
    with pytest.raises(BenchConfigError) as e:
        parse_bench_config(data)
    assert where in str(e.value)


def test_not_a_mapping():
    with pytest.raises(BenchConfigError, match="mapping"):
        parse_bench_config(["tasks"])


def test_load_file(tmp_path):
    p = tmp_path / "b.yaml"
    p.write_text("tasks: [x.csv, y.csv]\nmerge: {methods: [ties, linear]}\n")
    assert load_bench_config(p).merge.methods == ["ties", "linear"]
    with pytest.raises(BenchConfigError, match="does not exist"):
        load_bench_config(tmp_path / "missing.yaml")
    p.write_text("tasks: [x\n")
    with pytest.raises(BenchConfigError, match="not valid YAML"):
        load_bench_config(p)


def test_example_configs_are_valid():
    from pathlib import Path

    from splice.demo import BENCH_DEMO

    root = Path(__file__).resolve().parents[2]
    cfg = load_bench_config(root / "benchmarks" / "bench_4tasks.yaml")
    assert cfg.tasks == ["tweet_sentiment", "bbc_news", "spam", "wordnet_supersense"]
    assert cfg.merge.methods == "core"
    cfg8 = load_bench_config(root / "benchmarks" / "bench_8tasks.yaml")
    assert cfg8.tasks[:4] == cfg.tasks and len(set(cfg8.tasks)) == 8
    assert cfg8.data == cfg.data and cfg8.training == cfg.training
    data_free = ["linear", "task_arithmetic", "ties", "tsv", "iso_c"]
    data_aware = ["fisher", "regmean", "regmean++", "fisher_graft", "fw_merging"]
    assert cfg8.merge.methods == [*data_free, *data_aware, "adamerging", "adamerging++"]
    assert cfg8.merge.sweep and cfg8.gate.levels == ["sequence", "token"]
    assert cfg8.compose_rows == ["oracle", "retrieval", "gate", "fusion", "twin_merging"]
    compose4 = load_bench_config(root / "benchmarks" / "bench_compose4.yaml")
    assert compose4.tasks == cfg.tasks and compose4.kinds == ["lora"]
    assert compose4.data == cfg.data and compose4.training == cfg.training
    assert compose4.lora == cfg.lora  # the same LoRA experts (one cache serves both)
    for other in sorted((root / "benchmarks").glob("bench_*.yaml")):
        load_bench_config(other)  # every shipped bench config is valid
    demo = parse_bench_config(BENCH_DEMO)
    assert set(demo.kinds) == {"full", "lora"} and len(demo.tasks) == 3


@pytest.mark.parametrize(
    "over, match",
    [
        ({"compose": ["oracle"], "kinds": ["full"]}, "'compose': .*add lora to kinds"),
        ({"compose": ["mixture"]}, "'compose.0': Input should be 'oracle', 'retrieval', "),
        ({"compose": ["oracle", "oracle"]}, "compose must be distinct"),
        ({"retrieval": {"k": 0}}, "'retrieval.k'"),
        ({"retrieval": {"temperature": 0}}, "'retrieval.temperature'"),
        ({"retrieval": {"temperature": float("inf")}}, "'retrieval.temperature'"),
        ({"retrieval": {"top_k": 2}}, "'retrieval.top_k'"),
    ],
)
def test_compose_config_errors(over, match):
    with pytest.raises(BenchConfigError, match=match):
        parse_bench_config({"tasks": ["a.csv", "b.csv"], **over})


def test_compose_defaults():
    base = {"tasks": ["a.csv", "b.csv"]}
    assert parse_bench_config(base).compose_rows == ["oracle", "retrieval"]
    assert parse_bench_config({**base, "kinds": ["full"]}).compose_rows == []
    assert parse_bench_config({**base, "compose": []}).compose_rows == []
    assert parse_bench_config({**base, "compose": None}).compose_rows == ["oracle", "retrieval"]
    cfg = parse_bench_config({**base, "compose": ["retrieval"], "retrieval": {"k": 1}})
    assert cfg.compose_rows == ["retrieval"] and cfg.retrieval.k == 1
