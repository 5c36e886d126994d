"""`splice bench`: fine-tune experts on real tasks, merge their backbones with every
applicable method, and measure what survives (per-task accuracy, normalized accuracy).

    from splice.bench import load_bench_config, run_bench
    results = run_bench(load_bench_config("benchmarks/bench_4tasks.yaml"), "out/")

Modules, one concept each: `config` (the strict YAML), `tasks` (data and splits),
`cache` (content-hash keys, atomic folders), `backbone` (backbone/head split, the base),
`experts` (training, cached), `evaluate` (features once, heads per task), `methods` (the
method table: defaults, sweep grids, what applies), `merging` (the engine round trip),
`search` (coefficient-search rows), `run` (the orchestration), `ray_run` (its units as
Ray tasks, ``--ray``), `results` (the typed results, results.json), `report` (table,
plots, the output files).
"""

from splice.bench.config import BenchConfig, BenchConfigError, load_bench_config, parse_bench_config
from splice.bench.run import run_bench

__all__ = [
    "BenchConfig",
    "BenchConfigError",
    "load_bench_config",
    "parse_bench_config",
    "run_bench",
]
