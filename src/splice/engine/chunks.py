"""Row chunks: a large tensor merged and written a slice of rows at a time.

The memory of a merge job grows with its tensor: the inputs in the compute dtype plus the
method's scratch (`job_cost`), about 40 bytes per entry for TIES over three models in
float32. The embedding and lm_head matrices are the largest tensors of a language model
(vocabulary × hidden: 33M entries, 1.3 GB of job memory at 0.37B parameters), so without
chunking they, not ``--memory``, set the peak.

A job whose estimated cost exceeds its share of the budget (``memory_budget`` over the jobs
that may run at once) is split along its first dimension into chunks of rows, each within
the share, when the job's result at an entry depends only on the inputs at that entry and
on per-tensor values known before the first chunk (weights, λ, the LiNeS depth scale, the
output dtype): copies, and the methods in `ELEMENTWISE_METHODS`, when every input is read
from safetensors files (which read a chunk's rows alone). Each chunk reads only its
rows of every input (`splice.io.mapped.read_rows`), merges them with the same method, casts
them and hands them to the writer, which stores them in order (`ShardedWriter.write_rows`),
so the output is bit for bit the unchunked one, and the input digests for ``--resume``
(hashed chunk by chunk in row order) and the shard's record are the same too.

Methods that need whole-tensor statistics first (the k-th magnitude of a TIES / DARE trim,
SLERP's norms and dot product, Model Stock's cosines, random masks drawn over the whole
tensor) are not chunked here: they would need their statistics and their elementwise steps
split apart through the method interface (then the elementwise steps can run per chunk).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping

import torch

from splice.engine.driver import Sources, source_key
from splice.engine.plan import MergePlan
from splice.io.shard_record import input_hasher, raw_bytes

# Methods whose merged entry is a function of the input entries at that position and of
# per-tensor parameters only, in both dialects and every compute dtype (mergekit's stacked
# bfloat16 arithmetic sums over the model axis, entry by entry).
ELEMENTWISE_METHODS = frozenset({"linear", "task_arithmetic"})


def chunkable(plan: MergePlan, index: int) -> bool:
    """Whether job ``index`` gives the same result merged in row chunks."""
    job = plan.jobs[index]
    if len(job.out.shape) < 1 or job.out.shape[0] < 2:
        return False
    if any(plan.readers[s.ref].info(s.name).shape != job.out.shape for s in job.sources):
        return False
    # only readers that read a chunk's rows alone (safetensors), not the whole tensor per chunk
    if not all(getattr(plan.readers[s.ref], "rows_direct", False) for s in job.sources):
        return False
    if job.kind == "copy":
        return True
    method = plan.method
    return (
        method.name in ELEMENTWISE_METHODS
        and method.representation == "dense"
        and not method.random
        and plan.data is None
        and not plan.stat_requests
    )


def rows_per_chunk(plan: MergePlan, index: int, cost: int, share: int) -> int | None:
    """Rows per chunk so that a chunk's estimated cost is at most ``share`` (at least one
    row), or None when job ``index`` fits its share or cannot be chunked."""
    if cost <= share or not chunkable(plan, index):
        return None
    rows = plan.jobs[index].out.shape[0]
    return max(1, min(rows - 1, rows * share // cost))


def merged_rows(
    sources: Sources,
    plan: MergePlan,
    index: int,
    rows_per: int,
    combine: Callable[[list[torch.Tensor]], torch.Tensor],
    record: MutableMapping[str, str],
) -> Iterator[torch.Tensor]:
    """Job ``index`` chunk by chunk: rows of every source (stored dtype; converted to the
    compute dtype for a merge), ``combine``d, cast to the output dtype. The sources' digests
    go into ``record`` after the last chunk."""
    job = plan.jobs[index]
    cd = None if job.kind == "copy" else plan.job_compute_dtype(job)
    srcs = job.sources
    infos = [plan.readers[s.ref].info(s.name) for s in srcs]
    hashers = [input_hasher(i.dtype, i.shape) for i in infos]
    rows = job.out.shape[0]
    for start in range(0, rows, rows_per):
        stop = min(rows, start + rows_per)
        parts = []
        for s, h in zip(srcs, hashers, strict=True):
            part = sources.read_rows(s.ref, s.name, start, stop)
            h.update(raw_bytes(part))
            parts.append(part if cd is None else part.to(cd))
        out = combine(parts)
        del parts
        yield out.to(job.out.dtype).contiguous()
        del out
    for s, h in zip(srcs, hashers, strict=True):
        record[source_key(s.ref, s.name)] = h.hexdigest()
