#!/usr/bin/env python
"""Check splice.delta.argsort_select (mergekit's top-k set without sorting) by hand.

The algorithm now lives in src/splice/delta/argsort_select.py; this script times it
against torch.argsort on real task vectors and checks the kept sets are identical.

Original notes:

mergekit 0.1.5 trims a task vector with ``torch.argsort(|δ|, descending=True)[:k]``. On
the CPU, torch's (unstable) argsort of a 1-D float tensor is libstdc++'s ``std::sort``
(introsort) over (value, index) pairs with a "greater than" comparison, so which of several
equal magnitudes at the keep boundary survive is decided by introsort's partition steps.
splice's mergekit dialect reproduces that by calling the same argsort whenever equal
magnitudes straddle the boundary, which with bfloat16 inputs is nearly every tensor, and
then the sort dominates a TIES merge (benchmarks/profile_splice.py).

The first k positions of an introsort are fixed as soon as the partition containing the
boundary k is down to 16 entries: introsort only ever recurses into both halves, the halves
never exchange entries afterwards (each later step, including the final insertion sort,
moves entries only within a partition, and never past an equal one), so the halves left
and right of the boundary can be dropped without being sorted. Following introsort's own
steps along that single path (median-of-three pivot, Hoare partition, then a stable
insertion sort of the last <= 16 entries) is a quickselect that gives exactly the same set
in expected O(n) instead of O(n log n). One Hoare partition is vectorized: the left scan
stops at entries <= pivot, the right scan at entries >= pivot; the t-th stops of the two
scans are swapped while they have not crossed, and the cut is where they cross.

    python benchmarks/argsort_select_check.py --check          # random cases vs torch.argsort
    python benchmarks/argsort_select_check.py --models .bench/models-full   # real deltas

The second form times argsort and the prototype on every tensor of the benchmark's three
fine-tunes (δ = ft − base in float32, densities 0.2/0.3/0.5 as in the TIES recipe) and
checks the kept sets are identical. Single-threaded; numpy for the partition steps (its
flatnonzero is ~4x faster than torch.nonzero on the CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

from splice.delta.argsort_select import argsort_topk_mask


def reference(x: torch.Tensor, k: int) -> torch.Tensor:
    out = torch.zeros(x.numel(), dtype=torch.bool)
    out[torch.argsort(x, descending=True)[:k]] = True
    return out


def check(cases: int) -> int:
    g = torch.Generator().manual_seed(0)
    bad = 0
    for trial in range(cases):
        n = int(torch.randint(1, 5000, (1,), generator=g))
        kind = trial % 3
        if kind == 0:  # bf16-like task vector: few distinct magnitudes
            x = (torch.randn(n, generator=g) * 0.002).bfloat16().float().abs()
        elif kind == 1:  # extreme ties
            x = torch.randint(0, 4, (n,), generator=g).float()
        else:  # no ties
            x = torch.randn(n, generator=g).abs()
        k = int(torch.randint(0, n + 1, (1,), generator=g))
        bad += not torch.equal(reference(x, k), argsort_topk_mask(x, k))
    print(f"{cases} random cases: {bad} differ from torch.argsort")
    return 1 if bad else 0


def _tensors(d: Path) -> dict[str, Path]:
    idx = d / "model.safetensors.index.json"
    if idx.is_file():
        return {n: d / f for n, f in json.loads(idx.read_text())["weight_map"].items()}
    f = d / "model.safetensors"
    with safe_open(str(f), "pt") as fh:
        return {n: f for n in fh.keys()}  # noqa: SIM118 (safe_open is not a dict)


def on_models(root: Path, densities: tuple[float, ...] = (0.2, 0.3, 0.5)) -> int:
    torch.set_num_threads(1)
    base_files = _tensors(root / "base")
    t_sort = t_proto = 0.0
    bad = count = 0
    for name, f in base_files.items():
        with safe_open(str(f), "pt") as fh:
            base = fh.get_tensor(name).float()
        for i, dens in enumerate(densities):
            ff = _tensors(root / f"ft{i}")[name]
            with safe_open(str(ff), "pt") as fh:
                mag = (fh.get_tensor(name).float() - base).abs().reshape(-1)
            k = max(1, int(dens * mag.numel()))  # mergekit's count
            t0 = time.perf_counter()
            ref = reference(mag, k)
            t1 = time.perf_counter()
            got = argsort_topk_mask(mag, k)
            t2 = time.perf_counter()
            t_sort += t1 - t0
            t_proto += t2 - t1
            bad += not torch.equal(ref, got)
            count += 1
    print(
        f"{count} trims of real task vectors: argsort {t_sort:.1f} s, prototype "
        f"{t_proto:.1f} s ({t_sort / t_proto:.1f}x less), {bad} kept sets differ"
    )
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--check",
        type=int,
        nargs="?",
        const=600,
        default=None,
        help="compare with torch.argsort on N random cases (600)",
    )
    ap.add_argument("--models", type=Path, help="a benchmark models folder (base, ft0..ft2)")
    args = ap.parse_args(argv)
    rc = 0
    if args.check is not None:
        rc |= check(args.check)
    if args.models is not None:
        rc |= on_models(args.models)
    if args.check is None and args.models is None:
        ap.print_help()
    return rc


if __name__ == "__main__":
    sys.exit(main())
