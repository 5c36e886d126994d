"""Row chunks: a large tensor merged and written a slice of rows at a time.

The memory of a merge job grows with its tensor: the inputs in the compute dtype plus the
method's scratch (`job_cost`), about 40 bytes per entry for TIES over three models in
float32. The embedding and lm_head matrices are the largest tensors of a language model
(vocabulary × hidden: 33M entries, 1.3 GB of job memory at 0.37B parameters), so without
chunking they, not ``--memory``, set the peak.

A job whose estimated cost exceeds its share of the budget (``memory_budget`` over the jobs
that may run at once) is split along its first dimension into chunks of rows, each within
the share, when every input is read from safetensors files (which read a chunk's rows
alone) and the method says its result on a slice of rows is those rows of its whole result
(`MergeMethod.row_chunks`): copies; the elementwise methods (linear, task arithmetic); a
magnitude trim followed by an elementwise combine (TIES, magnitude_prune; not with
``rescale: true``, whose L1 norms span the whole tensor); DARE's seeded random drop
followed by an elementwise combine (dare_linear, dare_ties; inverse rescale or none, and
in the splice dialect the L1 rescale given the whole tensor's norms, below); and, in the
splice dialect, SLERP and Model Stock given the whole tensor's Gram matrix (below). Each
chunk reads only its rows of every input (`splice.io.mapped.read_rows_as`: converted from
the mapped rows), merges them with
the same method (its first flat entry, first row × entries a row, in
``MergeContext.flat_offset``), casts them and hands them to the writer, which stores them
in order (`ShardedWriter.write_rows`), so the output is bit for bit the unchunked one, and
the input digests for ``--resume`` (hashed chunk by chunk in row order) and the shard's
record are the same too.

The chunks are read ahead (`merged_rows`): the driver's reader thread
(`splice.engine.prefetch`) reads, hashes and converts chunk k+1's rows while the worker
merges, casts and writes chunk k, and reads the first chunk's when the job is admitted,
as it reads an unchunked job's inputs (`chunk_read`, one of the job's reads; after the
whole-tensor selection for a job that starts with one, whose peak is then not raised:
`first_chunk_ahead`). A chunked job thus holds a chunk's merge plus the next chunk's
inputs, and its rows per chunk are chosen for both to fit its share (`rows_per_chunk`;
`execute.chunked_cost`: the chunk's share of `job_cost` plus its share of `input_cost`;
TIES over three bf16 models in float32, 42 + 18 bytes an entry, has 30% fewer rows a
chunk than without the read-ahead). The digests stay in row order: a chunk's read is
scheduled only once the one before it is taken, so one chunk at a time is read, on
whichever thread (a worker that needs a chunk whose read the reader has not started, busy
with other jobs' inputs, reads it itself: `Sources.fetch`). A job that fails drops the
chunk read ahead for it (cancelled, or its rows let go when it ends). Without a reader
thread (``read_ahead=0``) the worker reads each chunk itself; the files are the same.

DARE's keep mask of model i is drawn serially from a generator seeded per (seed, tensor,
i), two 32-bit words an entry (`splice.merge.methods.dare`): the mask of a chunk is the
stream from its first flat entry on, which the compiled drop reaches by skipping 2·offset
words (the generator's state twisted, no tempering: ~0.4 ns an entry; the chunks of a
tensor skip n·(chunks − 1)/2 entries in all) and torch's path by drawing and discarding
the earlier entries a million at a time. Whether torch's draws split that way is checked
once per process (`dare.split_draws_agree`; where not, DARE is not chunked). A random
method is chunked only without ``allow_nonfinite``: a δ with a NaN or an infinity goes to
torch's multiply, whose NaN bits may depend on the chunk's length.

A magnitude trim is elementwise once its `KeepRule` is known: keep |δ| > v, plus the first
``tie_quota`` entries equal to v in flat order. Row chunks are consecutive in flat order, so
a chunk's rule is (v, the quota left after the earlier chunks, capped at the chunk's own
entries equal to v), and TIES' sign election and disjoint mean are entrywise after it:

- ``scope: model``: the whole-model passes (`splice.engine.topk`) rank a chunked job a
  chunk at a time, in row order, so they give each chunk's rule directly (and hold only a
  chunk's rows: the passes' memory is bounded too).
- ``scope: tensor`` (`TensorTopK`): a statistics pre-pass over the chunks finds v by the
  same radix selection (`topk.select_rules` with the chunks as its parts: two extra reads of
  the tensor's rows), k = `keep_count` (n, density, dialect), and gives each chunk its rule.
  The splice dialect breaks ties at v in flat order, which the rules do. The mergekit
  dialect breaks them in torch's unstable sort order over the whole tensor, which no rule
  repeats: where the radix selection finds entries equal to v left out (the top-k set is not
  unique), and always for 16-bit inputs or compute dtype (a few thousand distinct magnitudes
  over millions of entries nearly always leave some out), the pre-pass selects over the
  whole tensor, one model at a time, the entries the unchunked merge's `trim_torch_sort_`
  keeps of δ = θ − base (in the compute dtype), and keeps only each chunk's rows of the
  keep mask, packed 8 entries a byte (`KeepMask`, n/8 bytes per model), the chunk's answer
  in place of a rule. The job finds them when it starts, so only the masks of the jobs in
  flight are held. The selection sorts (|δ|, flat index) pairs along introsort's path
  (`splice.delta.argsort_select`); with the compiled extension those pairs are filled a
  chunk of rows at a time (`select_pairs_packed`), so the pass holds 8 bytes an entry and
  the packed mask: 8·n + n/8, whatever the dtype. Without it (or in the rare case where
  introsort would switch to heapsort) δ is built whole, a chunk at a time, and trimmed in
  place: its s bytes an entry plus the selection's 9 ((s+9)·n; (s+13)·n for float16, whose
  float32 magnitudes are a copy). Either is under a third of the unchunked job's own
  estimate (`job_cost`, 44·n to 46·n for TIES over three models). The job's cost
  (`tensor_pass_cost`) is the larger of that
  peak and a chunk's, plus the packed masks, held until the job is written. The chunk
  applies its mask as δ · mask, so a dropped δ = ±∞ (16-bit overflow of θ − base; inputs
  are finite) would be NaN where the compiled trim leaves a zero; it never shows: an ∞
  dropped means the k kept entries are all ∞, the output is not finite either way and
  the merge stops with the same `NonFiniteError`.

Magnitudes are those of the unchunked merge (`job_magnitudes`, the one reader for the
whole-model passes and the per-tensor pre-pass): δ = θ − base in the compute dtype, |δ| in
float32 (`splice.delta.topk.magnitude`).

SLERP's norms and dot product and Model Stock's cosines (``scope: tensor``) are a Gram
matrix over the whole tensor (`TensorGram`): of (base, θ_1) for SLERP, of the task vectors
δ_i = θ_i − base (taken in the compute dtype) for Model Stock. The splice dialect defines
it in row order (`splice.merge.methods._row_gram`): each first-dimension row's partial
sums in float64 (entries cast to float64, the row reduced serially by torch, alone), the
partials added one at a time in row order. Row chunks are consecutive rows, so a pre-pass
(`chunk_gram`: one read of every input's rows, a chunk at a time) fed the chunks in order
gives the unchunked merge's Gram bit for bit, and every chunk of the job is answered
with it; the method then merges the chunk elementwise (SLERP: c_a·a + c_b·b as two
products and a sum, whose bits do not depend on the chunk's length; Model Stock:
base + t·mean δ). The pre-pass holds a chunk's inputs and m + 1 float64 blocks of up to
2^16 entries (`tensor_pass_cost`). Model Stock's ``scope: row`` (one t per last-axis row)
needs no pre-pass: a first-dimension row chunk of a tensor of 2 or more dimensions holds
whole last-axis rows (a 1-D tensor is one row: not chunked). The mergekit dialect's SLERP
and Model Stock repeat mergekit's reductions (float32 over 2^20-entry chunks and torch's
thread ranges of the whole tensor, `splice.merge.reductions`), whose vectorised partial sums
no row chunk repeats: they are not chunked (either scope).

DARE's L1 rescale δ̂_i = m_i ⊙ δ_i · |δ_i|_1 / |m_i ⊙ δ_i|_1 in the splice dialect takes
both norms as row-order float64 sums too (`RowOrderSum` of `row_abs_sums`). Its
`RowPartials` request is answered by `chunk_row_partials`: the method's own
``row_partials`` (`dare.dare_l1_partials`: δ, its per-row L1, the chunk's drop drawn at
its flat offset, the per-row L1 after) on each chunk, in row order, so the totals are the
unchunked merge's bits; the chunk's merge then draws the same drop and multiplies by the
float64 ratio. The pre-pass draws every drop twice in all (once there, once in the
merge). The mergekit dialect's L1 rescale (``rescale: true``, its default) sums |δ| in the
compute dtype in torch's order, as mergekit: not chunked; nor TIES' L1 rescale, nor DELLA
(its keep probabilities rank magnitudes within each last-axis row, and its mask is drawn
with torch's tensor-probability Bernoulli, one word an entry: a row chunk's would be the
stream from its first entry too, but no skip is written for it).

Chunk buffers are a few to 30 MB, the sizes glibc keeps on its heap once freed; ``splice
merge`` fixes its mmap threshold (`splice.engine.heap`) so that they go back to the system
and the peak RSS follows ``--memory``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch

from splice.delta.argsort_select import PAIR, fill_pairs, pairs_selectable, select_pairs_packed
from splice.delta.topk import keep_count, magnitude, trim_torch_sort_
from splice.engine.driver import Sources, source_key
from splice.engine.plan import MergePlan, TensorJob
from splice.engine.prefetch import Call
from splice.engine.topk import select_rules
from splice.io import scratch
from splice.io.shard_record import input_hasher
from splice.merge import (
    KeepMask,
    MergeContext,
    RowPartials,
    StatRequest,
    TensorGram,
    TensorTopK,
    TopKThreshold,
)
from splice.merge.methods._row_gram import ROW_BLOCK, RowGram, RowOrderSum


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
    if (
        method.row_chunks is None
        or not method.row_chunks(job.params, plan.recipe.dialect, len(job.out.shape))
        or method.representation != "dense"
        or plan.data is not None
    ):
        return False
    if not tensor_requests(plan, index) and not method.random:
        return True
    # the per-tensor selection ranks float32 bit patterns, which NaN has none of; a random
    # drop leaves a δ with a NaN or an infinity to torch's mul, whose NaN bits may differ
    # with the chunk's length
    return not plan.allow_nonfinite


def _sixteen_bit(plan: MergePlan, job: TensorJob) -> bool:
    """Whether the job's inputs or compute dtype are 16-bit (ties at a threshold then all
    but certain)."""
    dtypes = [plan.job_compute_dtype(job)] + [
        plan.readers[s.ref].info(s.name).dtype for s in job.sources
    ]
    return any(t.itemsize < 4 for t in dtypes)


PerTensor = TensorTopK | TensorGram | RowPartials


def tensor_requests(plan: MergePlan, index: int) -> list[PerTensor]:
    """The job's per-tensor statistics (`TensorTopK`, `TensorGram`, `RowPartials`): a
    chunked job's are answered per chunk by `chunk_tensor_rules` before the merge starts."""
    if plan.jobs[index].kind == "copy":
        return []
    stats = plan.method.model_stats
    declared = stats(plan.jobs[index].params) if stats is not None else []
    return [r for r in declared if isinstance(r, (TensorTopK, TensorGram, RowPartials))]


def _trim_requests(plan: MergePlan, index: int) -> list[TensorTopK]:
    return [r for r in tensor_requests(plan, index) if isinstance(r, TensorTopK)]


def _gram_vectors(plan: MergePlan, job: TensorJob, request: TensorGram) -> int:
    """m: the vectors of a `TensorGram` (the task vectors, or the base and the models)."""
    return len(job.inputs) + (0 if request.of_delta or job.base is None else 1)


def chunk_spans(rows: int, rows_per: int) -> list[tuple[int, int]]:
    """The row ranges [start, stop) of the chunks of ``rows_per`` rows (the last shorter)."""
    return [(a, min(rows, a + rows_per)) for a in range(0, rows, rows_per)]


def rows_per_chunk(
    plan: MergePlan, index: int, cost: int, share: int, ahead: int = 0
) -> int | None:
    """Rows per chunk so that a chunk's estimated cost plus the next chunk's inputs read
    ahead meanwhile (``cost`` and ``ahead``: bytes of the whole tensor's) is at most
    ``share`` (at least one row), or None when job ``index`` fits its share (``cost``
    alone) or cannot be chunked."""
    if cost <= share or not chunkable(plan, index):
        return None
    rows = plan.jobs[index].out.shape[0]
    return max(1, min(rows - 1, rows * share // (cost + ahead)))


ChunkInputs = tuple[list[torch.Tensor], list[Any]]  # a chunk's rows per source; the hashers


def read_chunk(
    sources: Sources,
    plan: MergePlan,
    index: int,
    span: tuple[int, int],
    hashers: list[Any] | None = None,
) -> ChunkInputs:
    """Rows ``span`` of every source of job ``index``, in the compute dtype for a merge (as
    stored for a copy), their stored bytes hashed into ``hashers`` (the input digests,
    updated chunk by chunk in row order; new ones for the first chunk), which come back
    with the rows (a conversion reads the rows' mapped pages: `Sources.read_rows`). Runs on
    the read-ahead thread (`chunk_read`) or on the worker."""
    job = plan.jobs[index]
    cd = None if job.kind == "copy" else plan.job_compute_dtype(job)
    if hashers is None:
        infos = [plan.readers[s.ref].info(s.name) for s in job.sources]
        hashers = [input_hasher(i.dtype, i.shape) for i in infos]
    parts = [
        sources.read_rows(s.ref, s.name, *span, dtype=cd, hasher=h)
        for s, h in zip(job.sources, hashers, strict=True)
    ]
    return parts, hashers


def first_chunk_ahead(plan: MergePlan, index: int) -> bool:
    """Whether chunked job ``index``'s first chunk is read ahead when the job is admitted:
    not when the job starts with a whole-tensor selection (the mergekit dialect's per-tensor
    trims, `tensor_pass_cost`), whose peak would hold it too; it is read after."""
    return tensor_pass_cost(plan, index)[0] == 0


def chunk_read(
    sources: Sources,
    plan: MergePlan,
    index: int,
    rows_per: int,
    chunk: int = 0,
    hashers: list[Any] | None = None,
) -> Call:
    """The read of chunk ``chunk`` of job ``index`` (`read_chunk`) as a read-ahead `Call`:
    the first chunk's is scheduled when the job is admitted, each next one while the
    chunk before it is merged (`merged_rows`)."""
    span = chunk_spans(plan.jobs[index].out.shape[0], rows_per)[chunk]
    return Call(("rows", chunk), partial(read_chunk, sources, plan, index, span, hashers))


def merged_rows(
    sources: Sources,
    plan: MergePlan,
    index: int,
    rows_per: int,
    combine: Callable[[list[torch.Tensor], dict[StatRequest, Any], int], torch.Tensor],
    record: MutableMapping[str, str],
    chunk_rules: list[dict[StatRequest, Any]] | None = None,
) -> Iterator[torch.Tensor]:
    """Job ``index`` chunk by chunk: rows of every source (stored dtype; converted to the
    compute dtype for a merge), ``combine``d with the chunk's answers to the method's
    statistic requests (``chunk_rules``: each chunk's `KeepRule` per request, from the
    whole-model passes or `chunk_tensor_rules`) and its first flat entry (row × entries a
    row: ``MergeContext.flat_offset``), cast to the output dtype. The sources' digests go
    into ``record`` after the last chunk.

    The next chunk's rows are read ahead (`Sources.ahead`: on the reader thread, when the
    run has one) while a chunk is merged, cast and written; the first chunk's was scheduled
    when the job was admitted (`chunk_read`), else it is read now. One chunk's inputs are
    thus in flight beside a chunk's merge, which the job's cost counts (`rows_per_chunk`).
    The chunk reads hash in row order: each starts only after the one before it is done."""
    job = plan.jobs[index]
    spans = chunk_spans(job.out.shape[0], rows_per)
    cols = job.out.numel // job.out.shape[0]
    hashers: list[Any] = []
    following: Call | None = chunk_read(sources, plan, index, rows_per)  # read at admission
    for c, ((start, _), stats) in enumerate(
        zip(spans, chunk_rules or [{} for _ in spans], strict=True)
    ):
        assert following is not None
        parts, hashers = sources.fetch(following)
        following = None
        if c + 1 < len(spans):
            following = chunk_read(sources, plan, index, rows_per, c + 1, hashers)
            sources.ahead(following)
        out = combine(parts, stats, start * cols)
        del parts
        yield out.to(job.out.dtype).contiguous()
        del out
    for s, h in zip(job.sources, hashers, strict=True):
        record[source_key(s.ref, s.name)] = h.hexdigest()


def job_magnitudes(
    plan: MergePlan,
    job: TensorJob,
    requests: Sequence[TensorTopK | TopKThreshold],
    load: Callable[[str, str, torch.dtype], torch.Tensor],
) -> list[torch.Tensor]:
    """Per request, the float32 magnitudes the unchunked trim ranks, of the rows ``load``
    reads (reference, tensor name, dtype -> the rows, a fresh tensor of that dtype; a
    conversion reads mapped pages, `splice.io.mapped`): |θ_m − base| with the
    difference taken in the job's compute dtype, or |θ_m| for a whole-model request not of
    a delta. One reader of trim magnitudes for the whole-model passes and the per-tensor
    pre-pass alike; only the inputs the requests name are read."""
    cd = plan.job_compute_dtype(job)
    base = load(job.base.ref, job.base.name, cd) if job.base is not None else None
    out = []
    for r in requests:
        src = job.inputs[r.model_index]
        x = load(src.ref, src.name, cd)  # fresh: δ and |δ| are taken in place (no new pages)
        if getattr(r, "of_delta", True) and base is not None:
            x.sub_(base)
        out.append(x.abs_() if x.dtype == torch.float32 else magnitude(x))
    return out


def tensor_pass_cost(plan: MergePlan, index: int, rows_per: int | None = None) -> tuple[int, int]:
    """Bytes of job ``index``'s per-tensor statistics beyond a chunk's merge: the peak of
    the mergekit dialect's whole-tensor selection (the compiled pairs and the packed mask:
    8·n + n/8; else one model's δ in the compute dtype, s bytes an entry, and the
    selection's scratch: (s+9)·n, (s+13)·n for float16) and
    the packed keep masks held until the job is written (n/8 per trimmed model); counted
    whenever the dialect may need them (float32: only where ties are split). (0, 0) for
    the splice dialect, whose radix pre-pass holds one chunk's magnitudes at a time.

    A `TensorGram` pre-pass holds a chunk's inputs (at most a chunk's merge) and the float64
    scratch of `_row_gram` beside them: m + 1 blocks of ``ROW_BLOCK`` entries (at least a
    row; at most a chunk of ``rows_per`` rows, the whole tensor when None), counted as
    held; a `RowPartials` pre-pass (the method's own step on a chunk, at most its merge)
    one such block (the row sums' float64 scratch)."""
    job = plan.jobs[index]
    requests = tensor_requests(plan, index)
    if any(isinstance(r, (TensorGram, RowPartials)) for r in requests):
        cols = job.out.numel // max(job.out.shape[0], 1)
        chunk = job.out.numel if rows_per is None else rows_per * cols
        block = min(chunk, max(ROW_BLOCK, cols))
        vectors = [
            _gram_vectors(plan, job, r) + 1 if isinstance(r, TensorGram) else 1
            for r in requests
            if isinstance(r, (TensorGram, RowPartials))
        ]
        return 0, 8 * max(vectors) * block
    requests = _trim_requests(plan, index)
    if plan.recipe.dialect != "mergekit" or not requests:
        return 0, 0
    cd = plan.job_compute_dtype(job)
    n = job.out.numel
    if pairs_selectable(n):  # the pairs, filled a chunk at a time, and the packed mask
        return 8 * n + -(-n // 8), len(requests) * -(-n // 8)
    scratch = 13 if cd == torch.float16 else 9
    return (cd.itemsize + scratch) * n, len(requests) * -(-n // 8)


def chunk_tensor_rules(
    sources: Sources, plan: MergePlan, index: int, rows_per: int
) -> list[dict[StatRequest, Any]]:
    """Each chunk's answer to every per-tensor request of job ``index``. A trim
    (`TensorTopK`): a `KeepRule` (radix selection over the chunks, two reads of their rows),
    or in the mergekit dialect, where that leaves entries equal to the threshold out or the
    job is 16-bit, a `KeepMask` of the chunk's rows (`chunk_keep_masks`). A `TensorGram`
    or `RowPartials`: the whole tensor's, the same for every chunk (`chunk_gram`,
    `chunk_row_partials`: one read of the rows)."""
    job = plan.jobs[index]
    requests = _trim_requests(plan, index)
    spans = chunk_spans(job.out.shape[0], rows_per)
    dialect = plan.recipe.dialect
    cols = job.out.numel // job.out.shape[0]
    answers: list[dict[StatRequest, Any]] = [{} for _ in spans]
    for g in tensor_requests(plan, index):
        if isinstance(g, (TensorGram, RowPartials)):
            if isinstance(g, TensorGram):
                total = chunk_gram(sources, plan, index, g, spans)
            else:
                total = chunk_row_partials(sources, plan, index, g, spans)
            for answer in answers:
                answer[g] = total
    whole = dialect == "mergekit" and _sixteen_bit(plan, job)
    ranked = [] if whole else requests

    def magnitudes(c: int) -> list[torch.Tensor]:
        start, stop = spans[c]
        return job_magnitudes(
            plan, job, ranked, lambda ref, name, dt: sources.read_rows(ref, name, start, stop, dt)
        )

    masked = requests if whole else []
    if ranked:
        rules, left_out = select_rules(
            ranked,
            range(len(spans)),
            lambda c: (spans[c][1] - spans[c][0]) * cols,
            magnitudes,
            count=lambda density, n: keep_count(n, density, dialect),
        )
        for c, answer in enumerate(answers):
            answer.update(rules[c])
        if dialect == "mergekit":
            masked = [r for r, n in zip(ranked, left_out, strict=True) if n]
    n = job.out.numel
    # one pairs buffer for every model's selection (its pages touched once, not per model)
    pairs = (
        scratch.empty((n * PAIR.itemsize,), torch.uint8) if masked and pairs_selectable(n) else None
    )
    for r in masked:
        for answer, mask in zip(
            answers, chunk_keep_masks(sources, plan, index, r, spans, pairs), strict=True
        ):
            answer[r] = mask
    return answers


def chunk_gram(
    sources: Sources,
    plan: MergePlan,
    index: int,
    request: TensorGram,
    spans: list[tuple[int, int]],
) -> torch.Tensor:
    """The `TensorGram` of job ``index`` from its rows chunk by chunk, in row order: the
    sources' rows in the compute dtype (δ_i = θ_i − base taken there, as the method's
    ``deltas_``, for ``of_delta``), fed to one `RowGram`, which gives the whole tensor's
    bits (`splice.merge.methods._row_gram`)."""
    job = plan.jobs[index]
    cd = plan.job_compute_dtype(job)
    gram = RowGram(_gram_vectors(plan, job, request))
    for a, b in spans:
        parts = [sources.read_rows(s.ref, s.name, a, b, cd) for s in job.sources]
        if request.of_delta and job.base is not None:
            base = parts.pop(0)
            for p in parts:  # fresh tensors (`read_rows`): in place
                p.sub_(base)
            del base
        gram.add(parts)
        del parts
    return gram.gram()


def chunk_row_partials(
    sources: Sources,
    plan: MergePlan,
    index: int,
    request: RowPartials,
    spans: list[tuple[int, int]],
) -> torch.Tensor:
    """The `RowPartials` of job ``index``: the method's ``row_partials`` of each chunk's
    rows (in the compute dtype, the base first; its context that of the chunk's merge:
    tensor name, seed, dialect, first flat entry), summed in row order (`RowOrderSum`)."""
    job = plan.jobs[index]
    fn = plan.method.row_partials
    assert fn is not None, f"{plan.method.name} declares {request} without row_partials"
    cd = plan.job_compute_dtype(job)
    cols = job.out.numel // job.out.shape[0]
    total: RowOrderSum | None = None
    for a, b in spans:
        parts = [sources.read_rows(s.ref, s.name, a, b, cd) for s in job.sources]
        base = parts.pop(0) if job.base is not None else None
        ctx = MergeContext(
            tensor_name=job.out.name,
            seed=plan.recipe.seed,
            dialect=plan.recipe.dialect,
            flat_offset=a * cols,
        )
        partials = fn(base, parts, ctx, job.params)
        del parts, base
        if total is None:
            total = RowOrderSum(tuple(partials.shape[1:]))
        total.add(partials)
    assert total is not None
    return total.result()


def chunk_keep_masks(
    sources: Sources,
    plan: MergePlan,
    index: int,
    request: TensorTopK,
    spans: list[tuple[int, int]],
    work: torch.Tensor | None = None,
) -> list[KeepMask]:
    """The keep mask of the mergekit dialect's per-tensor trim of one model over the whole
    tensor of job ``index``, as the unchunked merge selects it (δ in the compute dtype, the
    entries `trim_torch_sort_` keeps), split into the chunks' rows (``spans``) and packed.

    With the compiled selection (`pairs_selectable`): the (|δ|, flat index) pairs it sorts
    are filled a chunk of rows at a time, so the pass holds 8 bytes an entry and the packed
    mask, no whole δ (`select_pairs_packed`, the same introsort path). Otherwise, or where
    introsort would switch to heapsort: δ is built whole a chunk at a time and trimmed by
    `trim_torch_sort_` itself; a kept entry with δ = 0 is then marked as dropped (δ · mask
    is the same zero either way). ``work``: a uint8 tensor of 8n bytes for the pairs (the
    caller's, reused across models; held by the caller through the rare fallback below, which
    then needs (s + 9)·n bytes on top), else one is taken from the scratch pool."""
    job = plan.jobs[index]
    cd = plan.job_compute_dtype(job)
    cols = job.out.numel // job.out.shape[0]
    n = job.out.numel
    k = keep_count(n, request.density, plan.recipe.dialect)
    base, src = job.sources[0], job.sources[1 + request.model_index]

    def delta_rows(a: int, b: int) -> torch.Tensor:
        part = sources.read_rows(src.ref, src.name, a, b, cd)
        return part.sub_(sources.read_rows(base.ref, base.name, a, b, cd))

    if 0 < k < n and pairs_selectable(n):
        if work is None:
            work = scratch.empty((n * PAIR.itemsize,), torch.uint8)
        pairs = work.numpy().view(PAIR)
        clean = True
        for a, b in spans:
            mag = job_magnitudes(
                plan,
                job,
                [request],
                lambda ref, name, dt, a=a, b=b: sources.read_rows(ref, name, a, b, dt),
            )[0].reshape(-1)
            clean = fill_pairs(pairs, mag, a * cols)  # the selection takes no NaN (as the trim)
            del mag
            if not clean:
                break
        bits = select_pairs_packed(pairs, k) if clean else None
        del pairs
        if bits is not None:
            return [_packed_span(bits, a * cols, b * cols) for a, b in spans]
    delta = torch.empty(job.out.shape, dtype=cd)
    for a, b in spans:  # δ is entrywise: built a chunk at a time, no whole base held
        delta[a:b] = delta_rows(a, b)
    keep = trim_torch_sort_(delta, k).reshape(-1) != 0
    del delta
    return [KeepMask.pack(keep[a * cols : b * cols]) for a, b in spans]


def _packed_span(bits: np.ndarray, start: int, stop: int) -> KeepMask:
    """Entries [start, stop) of a packed mask (``numpy.packbits`` order), packed anew."""
    lo = start // 8
    flat = np.unpackbits(bits[lo : -(-stop // 8)])[start - 8 * lo : stop - 8 * lo]
    return KeepMask(np.packbits(flat), stop - start)
