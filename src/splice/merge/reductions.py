"""Whole-vector reductions in the order torch computes them with mergekit's thread count.

mergekit's SLERP and Model Stock reduce a whole tensor (or a 2^20-entry chunk of it) to one
number: SLERP's dot ``(x * y).sum(dim=1)`` on a [1, n] row, Model Stock's
``(δ_a * δ_b).sum(dim=-1)`` and ``torch.norm(δ, dim=-1)`` on the flattened task vectors. On
the CPU, torch splits a reduction *to a single output* over its intra-op threads once the
input has at least ``GRAIN`` (2^15) entries, so mergekit's result depends on the number of
threads it runs with (``--num-threads``, else torch's default: OMP_NUM_THREADS or the
cores). With N threads torch 2.x (``TensorIteratorBase::parallel_reduce`` and
``binary_kernel_reduce``, OpenMP backend) does:

- k = min(N, ceil(n / GRAIN)) ranges of c = ceil(n / k) entries (the last one shorter);
- each range reduced serially into its own slot of a buffer of N slots, which start at the
  identity (0);
- sum: the slots have the output's dtype, so in bfloat16 / float16 each range's sum is
  rounded to it; the result is the serial sum of the N slots (torch's own op over a
  [N] tensor);
- the float16 2-norm (torch's scalar ``NormTwoOps``; float32 and bfloat16 norms take a
  vectorised path that is serial per output whatever N): each slot is the sequential
  float32 sum of the squares of its range, the slots are added in order in float32, then
  sqrt, rounded to float16.

A reduction to several outputs (Model Stock's ``filter_wise`` rows) splits over the
outputs, each reduced serially, so it does not depend on N and is left to torch.

The functions below repeat those steps whatever the thread count of the process calling
them (each range is reduced serially: with one thread, or as the rows of a 2-D reduction).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from torch import Tensor

from splice.errors import RecipeError

GRAIN = 32768  # at::internal::GRAIN_SIZE: below it torch reduces serially
THREADS_ENV = "SPLICE_MERGEKIT_THREADS"
# torch's intra-op threads when splice was imported: what a mergekit process started on this
# machine uses by default (the engine later changes the count for its own jobs)
_DEFAULT_THREADS = torch.get_num_threads()


def mergekit_threads() -> int:
    """The thread count whose reduction order the mergekit dialect reproduces:
    ``$SPLICE_MERGEKIT_THREADS`` (mergekit's ``--num-threads``), else torch's default."""
    text = os.environ.get(THREADS_ENV)
    if text is None or not text.strip():
        return _DEFAULT_THREADS
    try:
        threads = int(text)
    except ValueError:
        threads = 0
    if threads < 1:
        raise RecipeError(f"{THREADS_ENV} must be a positive integer, got {text!r}")
    return threads


def _ranges(n: int, threads: int) -> list[tuple[int, int]] | None:
    """The (start, stop) ranges torch's threads reduce, or None when it reduces serially."""
    if n < GRAIN or threads <= 1:
        return None
    k = min(threads, math.ceil(n / GRAIN))
    size = math.ceil(n / k)
    return [(s, min(n, s + size)) for s in range(0, n, size)]


def _single_output(x: Tensor) -> bool:
    return x.dim() <= 1 or math.prod(x.shape[:-1]) == 1


def serial_row_sums(rows: Tensor) -> Tensor:
    """``rows.sum(dim=-1)`` of a 2-D tensor with each row reduced serially: torch does that
    for several rows, or for one row with one thread or under GRAIN entries; otherwise the
    row is reduced as both rows of a stride-0 [2, n] view (each serial; twice the work)."""
    if rows.shape[0] > 1 or rows.shape[1] < GRAIN or torch.get_num_threads() == 1:
        return rows.sum(dim=-1)
    return rows.expand(2, -1).sum(dim=-1)[:1]


def _whole_vector(x: Tensor) -> bool:
    """A CPU reduction to one output over at least GRAIN entries: the thread-dependent case."""
    return x.device.type == "cpu" and _single_output(x) and x.shape[-1] >= GRAIN


def sum_last(x: Tensor, threads: int) -> Tensor:
    """``x.sum(dim=-1)`` as torch computes it with ``threads`` intra-op threads."""
    if not _whole_vector(x):
        return x.sum(dim=-1)
    flat = x.reshape(-1)
    ranges = _ranges(flat.numel(), threads)
    if ranges is None:
        return serial_row_sums(flat.unsqueeze(0)).reshape(x.shape[:-1])
    (start, _), size = ranges[-1], ranges[0][1]
    parts = [serial_row_sums(flat[:start].view(-1, size))] if start else []
    parts.append(serial_row_sums(flat[start:].unsqueeze(0)))
    slots = torch.zeros(threads, dtype=x.dtype, device=x.device)
    torch.cat(parts, out=slots[: len(ranges)])
    return slots.sum().reshape(x.shape[:-1])


def norm_last(x: Tensor, threads: int) -> Tensor:
    """``torch.norm(x, dim=-1)`` as torch computes it with ``threads`` intra-op threads."""
    if x.dtype != torch.float16 or not _whole_vector(x):
        return torch.norm(x, dim=-1)
    n = x.shape[-1]
    ranges = _ranges(n, threads)
    if ranges is None and torch.get_num_threads() == 1:
        return torch.norm(x, dim=-1)  # serial, as wanted
    ranges = ranges or [(0, n)]  # serially: one range
    # numpy's float32 cumsum is the sequential sum (about 2.5 ns an entry here, against
    # torch's own 1.1 ns: float16 recipes only)
    squares = x.reshape(-1).float().square_().numpy()
    total = np.float32(0)
    for start, stop in ranges:
        # a float16 square is exact in float32; cumsum adds in order, in float32
        total = np.float32(total + np.cumsum(squares[start:stop], dtype=np.float32)[-1])
    norm = torch.tensor(np.sqrt(total, dtype=np.float32))
    return norm.to(x.dtype).reshape(x.shape[:-1])
