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
    print(res.tables)
