"""Which entries ``torch.argsort(x, descending=True)[:k]`` selects, without sorting.

mergekit trims a task vector with ``argsort(|δ|, descending=True)[:k]``. Where several
entries share the k-th largest magnitude (common with bf16 checkpoints), *which* of them
survive is decided by the sort's internal steps: on the CPU, torch's unstable sort is
libstdc++'s ``std::sort`` (introsort) over (value, index) pairs with a "greater than"
comparison. To give mergekit's tensors bit for bit, splice's mergekit dialect must select
the same entries.

Sorting the whole tensor costs O(n log n) per trim and dominated a mergekit-dialect TIES
merge. But introsort fixes the first k positions as soon as the partition holding the
boundary k is down to 16 entries: it recurses into both halves, the halves never exchange
entries afterwards, and the final insertion sort only moves entries within a partition and
never past an equal one. So following introsort's own steps along the single path that
contains k — median-of-three pivot moved to the front, unguarded Hoare partition, then a
stable ordering of the last <= 16 entries — is a quickselect that selects exactly the same
set in expected O(n). One Hoare partition is vectorized: the left scan stops at entries
<= pivot, the right scan at entries >= pivot; the t-th stops of the two scans are swapped
while they have not crossed, and the cut is where they cross. If introsort's depth limit
is reached (it would switch to heapsort), or the input has NaN, the real argsort is used.

This mirrors an implementation detail of torch's CPU build, so it is verified against the
real ``torch.argsort`` once per process on tie-heavy random inputs (`_self_check`); on any
mismatch splice falls back to the real sort for good. Shown exact on 600 random cases and
on all 657 trims of the 0.37B-parameter benchmark (benchmarks/merge_speed.py).

Two implementations of the same steps: the compiled extension `splice.delta._introselect`
(built at install time from ``_introselect.c``; it runs libstdc++'s partition loop itself, in
place on a copy of (value, index) pairs) and the vectorized numpy loop below, used when the
extension is absent (no C compiler at install time). Each is self-checked before first use;
the compiled one is preferred when it passes.
"""

from __future__ import annotations

import functools
from typing import Literal

import numpy as np
import torch

from splice.io import scratch

try:
    from splice.delta import _introselect
except ImportError:  # built without a C compiler: the numpy path below
    _introselect = None

Path = Literal["compiled", "python", "sort"]
_THRESHOLD = 16  # libstdc++ _S_threshold: partitions this small are left to insertion sort


def _median_of_three(v: np.ndarray, a: int, b: int, c: int) -> int:
    """libstdc++ __move_median_to_first's choice with comp(x, y) = x > y."""
    va, vb, vc = v[a], v[b], v[c]
    if va > vb:
        return b if vb > vc else (c if va > vc else a)
    if va > vc:
        return a
    return c if vb > vc else b


def _crossing(left: np.ndarray, right: np.ndarray) -> int:
    """Length of the prefix with left[t] < right[t] (left increasing, right decreasing)."""
    lo, hi = 0, min(len(left), len(right))
    while lo < hi:
        mid = (lo + hi) // 2
        if left[mid] < right[mid]:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _argsort_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    out = torch.zeros(x.numel(), dtype=torch.bool)
    out[torch.argsort(x, descending=True)[:k]] = True
    return out


def _introselect_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    n = x.numel()
    out = torch.zeros(n, dtype=torch.bool)
    if k <= 0:
        return out
    if k >= n:
        return out.fill_(True)
    mask = out.numpy()
    v = x.numpy()
    idx: np.ndarray | None = None  # positions in x of v's entries; None until first needed
    depth = 2 * (n.bit_length() - 1)  # introsort's depth limit: 2 * floor(log2 n)
    while len(v) > _THRESHOLD:
        size = len(v)
        if depth == 0:  # introsort would switch to heapsort: use the real sort
            return _argsort_mask(x, k)
        depth -= 1
        if idx is None:
            idx = np.arange(size, dtype=np.int32 if size < 2**31 else np.int64)
            v = v.copy()
        m = _median_of_three(v, 1, size // 2, size - 1)
        if m:
            v[0], v[m] = v[m], v[0]
            idx[0], idx[m] = idx[m], idx[0]
        pivot = v[0]
        body = v[1:]
        left = np.flatnonzero(body <= pivot)  # where the left scan stops, in order
        right = np.flatnonzero(body >= pivot)[::-1]  # where the right scan stops, in order
        swaps = _crossing(left, right)
        cut = 1 + min(
            left[swaps] if swaps < len(left) else size, right[swaps - 1] if swaps else size
        )
        ls, rs = left[:swaps] + 1, right[:swaps] + 1
        del left, right, body  # the scans' stop lists are the largest scratch: free them now
        if k >= cut:  # everything left of the cut is kept
            kept = idx[:cut].copy()
            kept[ls] = idx[rs]
            mask[kept] = True
            if k == cut:
                return out
            nv, ni = v[cut:].copy(), idx[cut:].copy()
            nv[rs - cut], ni[rs - cut] = v[ls], idx[ls]
            k -= cut
        else:
            nv, ni = v[:cut].copy(), idx[:cut].copy()
            nv[ls], ni[ls] = v[rs], idx[rs]
        v, idx = nv, ni
    if idx is None:
        idx = np.arange(len(v), dtype=np.int64)
    order = np.argsort(-v, kind="stable")  # the final insertion sort is stable
    mask[idx[order[:k]]] = True
    return out


def _compiled_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """The compiled selection (0 < k < n); the real argsort where introsort would switch to
    heapsort."""
    out = torch.zeros(x.numel(), dtype=torch.bool)
    if _introselect is None or not _introselect.torch_sort_topk(x.numpy(), k, out.numpy()):
        return _argsort_mask(x, k)
    return out


def _select(x: torch.Tensor, k: int, path: Path) -> torch.Tensor:
    n = x.numel()
    if k <= 0 or k >= n:
        return torch.full((n,), k >= n and n > 0, dtype=torch.bool)
    if path == "sort" or bool(torch.isnan(x).any()):
        return _argsort_mask(x, k)
    if path == "compiled":
        return _compiled_mask(x, k)
    return _introselect_mask(x, k)


def _check_cases() -> list[tuple[torch.Tensor, int]]:
    """Tie-heavy random inputs (bf16-rounded magnitudes, a few distinct values)."""
    g = torch.Generator().manual_seed(1234)
    cases = []
    for trial in range(60):
        n = int(torch.randint(17, 4000, (1,), generator=g))
        if trial % 2:
            x = (torch.randn(n, generator=g) * 0.002).bfloat16().float().abs()
        else:
            x = torch.randint(0, 4, (n,), generator=g).float()
        cases.append((x, int(torch.randint(1, n, (1,), generator=g))))
    return cases


@functools.cache
def selection_path() -> Path:
    """The implementation `argsort_topk_mask` uses in this process: "compiled" (the C
    extension) or "python" (numpy) when it reproduces this torch build's argsort on
    tie-heavy inputs, the compiled one first; else "sort" (the real argsort)."""
    cases = _check_cases()
    for path in ("compiled", "python"):
        if path == "compiled" and _introselect is None:
            continue
        if all(torch.equal(_select(x, k, path), _argsort_mask(x, k)) for x, k in cases):
            return path
    return "sort"


def _self_check() -> bool:
    """True when a quickselect reproduces this torch build's argsort (see `selection_path`)."""
    return selection_path() != "sort"


def _api_version() -> int:
    """The built extension's ``API_VERSION`` (1 for a build without the constant): 2, its
    ``torch_sort_trim`` takes a work buffer; 3, it looks for NaN itself."""
    return getattr(_introselect, "API_VERSION", 1)


@functools.cache
def _trim_takes_work() -> bool:
    """Whether the built extension's ``torch_sort_trim`` takes a work buffer (a build before
    ``API_VERSION`` 2 still works, allocating its own scratch)."""
    return _api_version() >= 2


def trim_like_argsort_(delta: torch.Tensor, k: int) -> bool:
    """In place: zero every entry of ``delta`` but the ``k`` that
    ``torch.argsort(|delta|, descending=True)[:k]`` selects (the zeros keep δ's sign, as
    ``delta * mask`` gives). Done in one compiled call for a contiguous float32 / bfloat16
    CPU tensor without NaN when the compiled path passed its self-check; returns False
    (``delta`` untouched) otherwise, and the caller masks with `argsort_topk_mask`. The
    extension looks for NaN itself while it builds its pairs (``API_VERSION`` 3; an older
    build gets a torch pass first)."""
    n = delta.numel()
    if (
        _introselect is None
        or not 0 < k < n
        or delta.device.type != "cpu"
        or delta.dtype not in (torch.float32, torch.bfloat16)
        or not delta.is_contiguous()
        or selection_path() != "compiled"
        or (_api_version() < 3 and bool(torch.isnan(delta).any()))
    ):
        return False
    buf = delta.view(torch.int32 if delta.dtype == torch.float32 else torch.int16).numpy()
    if n > 0xFFFFFFFF or not _trim_takes_work():  # the extension allocates its scratch
        return bool(_introselect.torch_sort_trim(buf, k, delta.element_size()))
    # its (value, index) pairs and keep bytes, 9n, in a scratch tensor (`splice.io.scratch`)
    work = scratch.empty((9 * n,), torch.uint8)
    return bool(_introselect.torch_sort_trim(buf, k, delta.element_size(), work.numpy()))


def argsort_topk_mask(x: torch.Tensor, k: int, path: Path | None = None) -> torch.Tensor:
    """Bool mask of the positions ``torch.argsort(x, descending=True)[:k]`` selects, for a
    1-D float32 CPU tensor; O(n) expected where the self-check passes, else the real sort.
    ``path`` forces an implementation (tests); by default the self-checked one."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return _argsort_mask(x.cpu().float(), k).to(x.device)
    return _select(x.contiguous(), k, path or selection_path())


PAIR = np.dtype([("v", "<f4"), ("i", "<u4")])  # the compiled selection's (value, index)


def pairs_selectable(n: int) -> bool:
    """Whether `select_pairs_packed` can select among ``n`` caller-built pairs: the
    compiled extension passed its self-check and flat indices fit in 32 bits."""
    return (
        _introselect is not None
        and hasattr(_introselect, "torch_sort_select_pairs")
        and 1 < n <= 0xFFFFFFFF
        and selection_path() == "compiled"
    )


def fill_pairs(pairs: np.ndarray, values: torch.Tensor, start: int) -> bool:
    """``pairs[start + j] = (values[j], start + j)`` for a contiguous float32 CPU tensor of
    values (a slice of the entries, e.g. a chunk of rows): one compiled pass where the
    extension has it (``API_VERSION`` 3), else numpy's. False when a value is NaN (the
    selection takes none; the pairs are then partly filled)."""
    if getattr(_introselect, "fill_pairs", None) is not None:
        return bool(_introselect.fill_pairs(pairs, values.numpy(), start))
    if bool(values.isnan().any()):
        return False
    stop = start + values.numel()
    pairs["v"][start:stop] = values.numpy()
    pairs["i"][start:stop] = np.arange(start, stop, dtype=np.uint32)
    return True


def select_pairs_packed(pairs: np.ndarray, k: int) -> np.ndarray | None:
    """The positions ``torch.argsort(values, descending=True)[:k]`` selects, as a packed
    keep mask (``numpy.packbits`` order, ⌈n/8⌉ bytes), from (value, flat index) pairs of
    dtype `PAIR` that the caller filled (value float32 without NaN, index = the entry's
    flat position; e.g. a slice of rows at a time, so that no whole copy of the values is
    held). The pairs are scrambled. None when ``pairs_selectable`` is false, k is not in
    (0, n), or introsort would switch to heapsort: the caller then selects another way
    (the pairs no longer hold their order)."""
    n = len(pairs)
    if pairs.dtype != PAIR or not pairs.flags.c_contiguous or not 0 < k < n:
        return None
    if not pairs_selectable(n):
        return None
    bits = np.zeros(-(-n // 8), dtype=np.uint8)
    if not _introselect.torch_sort_select_pairs(pairs, k, bits):
        return None
    return bits
