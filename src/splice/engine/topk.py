"""Exact whole-model top-k magnitude thresholds in bounded memory (radix selection).

Methods that trim over the whole task vector (TIES as in the paper, global magnitude
pruning) need, per model, the k-th largest |δ| over *all* tensors, k = round(density·N).
Holding every |δ| is out of the question for large models, so the statistic is found by
radix selection over the float32 bit patterns (for non-negative floats the int32 view is
monotonic in the value):

1. pass 1: a 65,536-bin histogram of the high 16 bits of every |δ| → the bucket holding
   the k-th largest, and how many of the k lie above it;
2. pass 2: inside that bucket, a histogram of the low 16 bits → the exact value v;
   per tensor, the number of entries equal to v is kept (as unique/count pairs of the
   bucket's low bits, at most 65,536 per tensor, usually far fewer);
3. the caller's apply pass keeps |δ| > v everywhere plus, in plan order, just enough
   entries equal to v (first ones in flat order within a tensor) to keep exactly k.

Memory: two 65,536-bin histograms per model plus the per-tensor tie counts; the inputs are
streamed one tensor at a time. Cost: two extra reads of the inputs. Each histogram is one
compiled pass over the magnitudes where the extension has it
(`splice.delta.topk.radix_histogram`: NaN check, bits, counts), else torch's isnan, shift,
mask and bincount; the same counts.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import torch

from splice.delta.topk import radix_histogram
from splice.engine.driver import passes
from splice.errors import MergeValidationError
from splice.merge import KeepRule, MergeMethod, TensorTopK, TopKThreshold

if TYPE_CHECKING:
    from splice.engine.plan import TensorJob

_BINS = 1 << 16

# Given a job index, return the float32 magnitudes of each requested model's delta
# (in the order of `requests`), one tensor each.
MagnitudeFn = Callable[[int], Sequence[torch.Tensor]]


def _histogram(mag: torch.Tensor, bucket: int | None) -> torch.Tensor:
    """The radix selection's counts (65,536 int64) of one tensor's magnitudes: by the high
    16 bits of every value (``bucket`` None), else by the low 16 bits of the values whose
    high 16 bits are ``bucket``. ValueError on NaN."""
    flat = mag.reshape(-1)
    if flat.dtype != torch.float32:
        flat = flat.float()
    counts, nan = radix_histogram(flat, bucket)
    if nan:
        raise ValueError("NaN in a task vector: cannot rank magnitudes")
    return counts


def _select(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """Bin b with above(b) < k <= above(b) + hist[b]; returns (b, above(b))."""
    above = torch.flip(torch.cumsum(torch.flip(hist, [0]), 0), [0]) - hist  # count > b
    ok = (above < k) & (above + hist >= k)
    b = int(torch.nonzero(ok)[-1])  # highest such bin (empty bins below share `above`)
    return b, int(above[b])


def keep_rules(
    requests: Sequence[TopKThreshold],
    jobs: Iterable[int],
    numel: Callable[[int], int],
    magnitudes: MagnitudeFn,
    threads: int = 1,
    progress: bool = False,
) -> dict[int, dict[TopKThreshold, KeepRule]]:
    """For each job index and request, the KeepRule that keeps exactly round(d·N) entries."""
    return select_rules(requests, jobs, numel, magnitudes, threads=threads, progress=progress)[0]


def select_rules(
    requests: Sequence[TopKThreshold | TensorTopK],
    jobs: Iterable[int],
    numel: Callable[[int], int],
    magnitudes: MagnitudeFn,
    *,
    count: Callable[[float, int], int] = lambda density, n: round(density * n),
    threads: int = 1,
    progress: bool = False,
) -> tuple[dict[int, dict[TopKThreshold | TensorTopK, KeepRule]], list[int]]:
    """`keep_rules` with the kept count k = ``count(density, N)`` of each request, and, per
    request, how many entries equal to its threshold are left out (0: the k kept entries
    are the only top-k set, whatever the tie order).

    The "jobs" may be any parts of the entries in flat order: the row chunks of one tensor
    give the per-chunk rules of a per-tensor top-k (`splice.engine.chunks`)."""
    job_list = list(jobs)
    total = sum(numel(j) for j in job_list)
    ks = [count(r.density, total) for r in requests]
    lock = threading.Lock()

    def run(fn: Callable[[int], None], label: str) -> None:
        passes(fn, job_list, threads=threads, label=label, progress=progress)

    # pass 1: high 16 bits
    hi_hist = [torch.zeros(_BINS, dtype=torch.int64) for _ in requests]

    def pass1(j: int) -> None:
        mags = magnitudes(j)
        local = [_histogram(m, None) for m in mags]
        with lock:
            for h, loc in zip(hi_hist, local):
                h += loc

    run(pass1, "trim threshold (1/2)")
    buckets: list[tuple[int, int] | None] = []
    for k, h in zip(ks, hi_hist):
        buckets.append(_select(h, k) if 0 < k < total else None)

    # pass 2: low 16 bits inside the chosen bucket, plus per-job tie counts
    lo_hist = [torch.zeros(_BINS, dtype=torch.int64) for _ in requests]
    per_job: dict[int, list[tuple[torch.Tensor, torch.Tensor] | None]] = {}

    def pass2(j: int) -> None:
        mags = magnitudes(j)
        entry: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        local: list[torch.Tensor | None] = []
        for m, bucket in zip(mags, buckets):
            if bucket is None:
                entry.append(None)
                local.append(None)
                continue
            counts = _histogram(m, bucket[0])
            present = counts.nonzero().squeeze(1)  # the bucket's low bits here, ascending
            entry.append((present, counts[present]))
            local.append(counts)
        with lock:
            per_job[j] = entry
            for h, loc in zip(lo_hist, local):
                if loc is not None:
                    h += loc

    if any(b is not None for b in buckets):
        run(pass2, "trim threshold (2/2)")

    rules: dict[int, dict[TopKThreshold | TensorTopK, KeepRule]] = {j: {} for j in job_list}
    left_out = [0] * len(requests)
    for ri, (req, k, bucket) in enumerate(zip(requests, ks, buckets)):
        if bucket is None:
            # keep nothing (k = 0) or everything (k = N)
            rule = KeepRule(float("inf"), 0) if k <= 0 else KeepRule(-1.0, 0)
            for j in job_list:
                rules[j][req] = rule
            continue
        b, above_b = bucket
        lo, above_lo = _select(lo_hist[ri], k - above_b)
        bits = torch.tensor([(b << 16) | lo], dtype=torch.int32)
        threshold = float(bits.view(torch.float32).item())
        remaining = k - above_b - above_lo  # entries equal to the threshold still to keep
        for j in job_list:  # plan order: deterministic tie assignment
            uc = per_job[j][ri]
            eq = 0
            if uc is not None:
                hit = (uc[0] == lo).nonzero()
                if hit.numel():
                    eq = int(uc[1][hit[0, 0]])
            quota = min(eq, remaining)
            remaining -= quota
            left_out[ri] += eq - quota
            rules[j][req] = KeepRule(threshold, quota)
    return rules, left_out


def _declared(method: MergeMethod, params: dict) -> list[TopKThreshold]:
    """The whole-model top-k requests of one tensor's parameters."""
    if method.model_stats is None:
        return []
    return [r for r in method.model_stats(params) if isinstance(r, TopKThreshold)]


def topk_requests(method: MergeMethod, jobs: list[TensorJob]) -> list[TopKThreshold]:
    """The whole-model top-k statistics the method declares (other requests need no pass);
    their parameters must not vary by tensor. A tensor that declares none (every model's
    density 0 or 1 there: nothing is ranked) is left out of the whole-model trim and of its
    count N (`topk_jobs`); every other tensor must declare the same."""
    ranked = [j for j in jobs if j.kind == "merge" and _declared(method, j.params)]
    if not ranked:
        return []
    requests = _declared(method, ranked[0].params)
    for j in ranked[1:]:
        if _declared(method, j.params) != requests:
            raise MergeValidationError(
                "whole-model trimming (scope: model) needs the same density for every "
                f"tensor, but '{j.out.name}' differs from '{ranked[0].out.name}'; "
                "use scope: tensor for per-tensor densities (a tensor may also keep "
                "density 1 for every model: it is then not trimmed nor counted)"
            )
    return requests


def topk_jobs(method: MergeMethod, jobs: list[TensorJob]) -> list[int]:
    """The indices of the jobs the whole-model trim spans: the merged tensors that declare
    its requests (`topk_requests`)."""
    return [i for i, j in enumerate(jobs) if j.kind == "merge" and _declared(method, j.params)]
