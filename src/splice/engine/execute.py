"""Execute a merge plan on the streaming driver (`splice.engine.driver`): threaded, bounded
memory, atomic output, resumable.

Each job reads its inputs (one tensor per model), merges them in the compute dtype (with the
answers to the method's whole-model requests, `splice.merge.stats`, and the recipe's LiNeS
post-step as a `DepthScale`), casts to the output dtype and hands the result to the sharded
writer, which places it at its pre-planned offset in its shard. Jobs run on the driver's
thread pool within ``memory_budget`` bytes of estimated job memory (`job_cost`).

Output appears atomically: shards are written into ``<out>.splice-partial/`` and the folder
is renamed to ``<out>`` only when complete. A failed or killed run leaves the partial
folder; ``resume=True`` keeps its completed shards and redoes the rest, giving a
bit-identical result (random methods draw from generators seeded by (seed, tensor name, model
index), independent of order). A shard is kept only when the recipe, plan and input paths
match (`fingerprint`), its file still hashes to what was written, and the inputs it was made
from still hash to what was read (`splice.engine.resume_check`; an input edited in place with
its size and mtime kept is caught). A second run into the same ``out_dir`` while one is
running is refused (the output folder's lock).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

import splice
from splice.engine.chunks import (
    chunk_read,
    chunk_spans,
    chunk_tensor_rules,
    first_chunk_ahead,
    job_magnitudes,
    merged_rows,
    rows_per_chunk,
    tensor_pass_cost,
    tensor_requests,
)
from splice.engine.driver import Output, Sources, Stream, StreamReport, write_stream
from splice.engine.layers import layer_index
from splice.engine.plan import MergePlan
from splice.engine.prefetch import Call, Read
from splice.engine.resume_check import InputCheck, Rules, rules_digest, stats_key
from splice.engine.topk import keep_rules, topk_jobs
from splice.errors import CheckpointError
from splice.io import model_dir_of
from splice.io.finite import numerical_errors
from splice.io.mapped import read_as, read_rows_as
from splice.io.open import model_side_files, split_reference
from splice.io.safe_paths import member
from splice.io.scratch import ScratchPool, installed
from splice.io.textfile import load_json_object
from splice.merge import DepthScale, KeepRule, MergeContext

# Compute dtypes in which the mergekit dialect repeats mergekit's own arithmetic (stacked).
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")

MergeReport = StreamReport


def _input_paths(plan: MergePlan) -> list[list[str | None]]:
    """Resolved (base, adapter) paths of every input reference, by `split_reference` (so a
    folder name holding '+' is one path). Content is checked per shard on resume."""
    out: list[list[str | None]] = []
    for ref in sorted(plan.readers):
        base, adapter = split_reference(ref)
        out.append([str(Path(base).resolve()), str(Path(adapter).resolve()) if adapter else None])
    return out


def fingerprint(plan: MergePlan, shard_bytes: int) -> str:
    """Identity of a run, for --resume: recipe, input paths, output layout, splice version."""
    layout = [(j.out.name, list(j.out.shape), str(j.out.dtype)) for j in plan.jobs]
    blob = json.dumps(
        [
            plan.recipe.model_dump(mode="json"),
            _input_paths(plan),
            layout,
            shard_bytes,
            splice.__version__,
        ]
        + ([plan.data.digest] if plan.data is not None else []),
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _config_json(plan: MergePlan) -> bytes | None:
    """The output's config.json: the reference model's, with the layer count and dtype of
    the merge. Read before any tensor is written: an unreadable, undecodable or invalid
    file, or one that is not a JSON object, is a `CheckpointError` and no output is made."""
    d = model_dir_of(plan.reference)
    path = member(d, "config.json") if d is not None else None
    if path is None:
        return None
    cfg = load_json_object(path, CheckpointError)
    if plan.num_layers_out is not None:
        for key in _LAYER_KEYS:
            if key in cfg:
                cfg[key] = plan.num_layers_out
    if plan.recipe.out_dtype or plan.recipe.dtype:
        cfg["torch_dtype"] = plan.recipe.out_dtype or plan.recipe.dtype
    cfg.pop("quantization_config", None)
    return (json.dumps(cfg, indent=2) + "\n").encode()


def _tokenizer_files(plan: MergePlan) -> list[Path]:
    src = plan.recipe.tokenizer_source
    ref = plan.reference if src in (None, "base") else src
    if src == "base" and plan.recipe.base_model:
        ref = plan.recipe.base_model
    return model_side_files(ref)


@dataclass
class _Runner:
    """One merge job: its inputs read (digests recorded), merged, cast to the output dtype."""

    plan: MergePlan
    sources: Sources
    rules: Rules
    chunks: dict[int, int] = field(default_factory=dict)  # job -> rows per chunk
    # job -> each chunk's `KeepRule`s of the whole-model trims (`_model_stat_rules`); the
    # per-tensor ones (`chunk_tensor_rules`) are found when the job starts
    chunk_rules: ChunkRules = field(default_factory=dict)

    def __post_init__(self) -> None:
        lines = self.plan.recipe.lines
        self.post = DepthScale(lines.alpha, lines.beta) if lines is not None else None
        # The output's layer count, for depth statistics (LiNeS).
        indices = [i for i in (layer_index(j.out.name) for j in self.plan.jobs) if i is not None]
        self.num_layers = self.plan.num_layers_out or (1 + max(indices) if indices else None)

    def reads(self, index: int) -> list[Read | Call]:
        """What job ``index`` reads, in order: (reference, tensor, dtype to convert to) of
        the copied tensor, or of the base and each input in the compute dtype; for a job
        merged in row chunks, its first chunk's rows (`chunk_read`: the job reads each next
        chunk ahead itself, `merged_rows`), unless the job first selects over its whole
        tensor (`first_chunk_ahead`)."""
        if index in self.chunks:
            if not first_chunk_ahead(self.plan, index):
                return []
            return [chunk_read(self.sources, self.plan, index, self.chunks[index])]
        return list(self._tensor_reads(index))

    def _tensor_reads(self, index: int) -> list[Read]:
        """The whole tensors job ``index`` reads (not chunked), in order."""
        job = self.plan.jobs[index]
        if job.kind == "copy":
            return [(job.inputs[0].ref, job.inputs[0].name, None)]
        cd = self.plan.job_compute_dtype(job)
        return [(s.ref, s.name, cd) for s in job.sources]

    def __call__(self, index: int) -> list[Output]:
        job = self.plan.jobs[index]
        seen: dict[str, str] = {}
        if index in self.chunks:
            if self.rules.get(index):
                seen[stats_key(job.out.name)] = rules_digest(self.rules[index])

            def combine(parts: list[torch.Tensor], stats: dict, offset: int) -> torch.Tensor:
                if job.kind == "copy":
                    return parts[0]
                return self._merge(index, parts, stats, offset)

            # per-tensor trims: each chunk's answers, found now (the job's cost counts them)
            chunk_rules = self.chunk_rules.get(index)
            if chunk_rules is None and tensor_requests(self.plan, index):
                chunk_rules = chunk_tensor_rules(self.sources, self.plan, index, self.chunks[index])
            rows = merged_rows(
                self.sources, self.plan, index, self.chunks[index], combine, seen, chunk_rules
            )
            return [Output(job.out.name, None, seen, rows=rows)]
        read = [
            self.sources.read(ref, name, seen, dt) for ref, name, dt in self._tensor_reads(index)
        ]
        if job.kind == "copy":
            out = read[0]
        else:
            if self.rules.get(index):
                seen[stats_key(job.out.name)] = rules_digest(self.rules[index])
            out = self._merge(index, read)
        del read
        return [Output(job.out.name, out.to(job.out.dtype).contiguous(), seen)]

    def _merge(
        self, index: int, read: list[torch.Tensor], stats: dict | None = None, offset: int = 0
    ) -> torch.Tensor:
        """The method on the job's inputs (the base first, when it has one) in the compute
        dtype, then the LiNeS post-step; ``read`` is consumed. ``stats``: a row chunk's
        answers to the method's statistic requests, in place of the job's; ``offset``: its
        first flat entry (``ctx.flat_offset``)."""
        job = self.plan.jobs[index]
        cd = self.plan.job_compute_dtype(job)
        base = read.pop(0) if job.base else None
        tensors = read
        model_stats: dict = {**self.rules.get(index, {}), **(stats or {})}
        if self.plan.data is not None:
            data = self.plan.data
            model_stats[data.request] = data.answer([s.name for s in job.inputs])
        ctx = MergeContext(
            tensor_name=job.out.name,
            seed=self.plan.recipe.seed,
            dialect=self.plan.recipe.dialect,
            model_stats=model_stats,
            layer_index=layer_index(job.out.name),
            num_layers=self.num_layers,
            flat_offset=offset,
        )
        # Methods may modify their inputs in place: the post-step keeps its own base.
        kept = base.clone() if self.post is not None and base is not None else None
        with numerical_errors(f"tensor '{job.out.name}': method '{self.plan.method.name}'"):
            out = self.plan.method(base, tensors, ctx, **job.params)
        if kept is not None:
            assert self.post is not None
            out = kept.add_(out.to(cd).sub_(kept), alpha=ctx.stat(self.post))
        return out


ChunkRules = dict[int, list[dict]]  # job -> each row chunk's statistic answers


def _model_stat_rules(
    plan: MergePlan, threads: int, progress: bool, chunks: Mapping[int, int]
) -> tuple[Rules, ChunkRules]:
    """The answers to the method's whole-model top-k requests (two extra passes): per job,
    and per row chunk of the jobs merged in chunks (``chunks``: job -> rows per chunk),
    whose rows the passes read a chunk at a time. Ranked in plan order, a chunked job's
    chunks in row order (= flat order), so a chunk's tie quota is what is left of its
    job's after the earlier chunks, and the job's is the sum of its chunks'."""
    requests = plan.stat_requests
    if not requests:
        return {}, {}
    # The statistic spans all merged tensors that declare it (`topk_jobs`: not those every
    # model keeps whole), also those a resumed run has done.
    merge_jobs = topk_jobs(plan.method, plan.jobs)
    units: list[tuple[int, tuple[int, int] | None]] = []  # (job, rows or None: whole)
    for i in merge_jobs:
        if i in chunks:
            units += [(i, span) for span in chunk_spans(plan.jobs[i].out.shape[0], chunks[i])]
        else:
            units.append((i, None))

    def numel(u: int) -> int:
        i, span = units[u]
        out = plan.jobs[i].out
        return out.numel if span is None else (span[1] - span[0]) * (out.numel // out.shape[0])

    def magnitudes(u: int) -> list[torch.Tensor]:
        i, span = units[u]

        def load(ref: str, name: str, dtype: torch.dtype) -> torch.Tensor:
            reader = plan.readers[ref]
            if span is None:
                return read_as(reader, name, dtype, digest=False)[0]
            return read_rows_as(reader, name, *span, dtype)

        return job_magnitudes(plan, plan.jobs[i], requests, load)

    found = keep_rules(requests, range(len(units)), numel, magnitudes, threads, progress)
    rules: Rules = {}
    per_chunk: ChunkRules = {}
    for u, (i, span) in enumerate(units):
        if span is None:
            rules[i] = found[u]
        else:
            per_chunk.setdefault(i, []).append(dict(found[u]))
    for i, parts in per_chunk.items():
        rules[i] = {
            r: KeepRule(parts[0][r].threshold, sum(p[r].tie_quota for p in parts)) for r in requests
        }
    return rules, per_chunk


def run_merge(
    plan: MergePlan,
    out_dir: str | Path,
    *,
    shard_bytes: int = 2_000_000_000,
    threads: int | None = None,
    resume: bool = False,
    overwrite: int | bool = False,
    recipe_text: str | None = None,
    progress: bool = True,
    memory_budget: int = 1_000_000_000,
    read_ahead: int = 2,
) -> MergeReport:
    """Run a planned merge into ``out_dir`` (HF folder: shards, index, config, tokenizer).

    ``memory_budget`` caps the estimated memory of the jobs in flight (see `job_cost`);
    a single job larger than it still runs, alone. ``read_ahead``: jobs admitted beyond the
    busy workers, whose inputs the reader thread reads meanwhile (0: no reader thread, each
    job reads its own inputs). ``overwrite``: 0 refuses an existing
    ``out_dir``, 1 replaces a previous splice output holding no input, 2 any folder.
    """
    threads = threads or default_job_threads()
    recipe_yaml = recipe_text or yaml.safe_dump(
        plan.recipe.model_dump(mode="json", exclude_defaults=True), sort_keys=False
    )
    extra = {"splice_recipe.yaml": recipe_yaml.encode()}
    config_json = _config_json(plan)  # side inputs first: no output if one is bad
    if config_json is not None:
        extra["config.json"] = config_json
    # A job costing more than its share of the budget (the jobs that may run at once) is
    # merged in row chunks where its method allows (`splice.engine.chunks`).
    share = memory_budget // (threads + max(read_ahead, 1))
    costs = [job_cost(plan, i) for i in range(len(plan.jobs))]
    chunks: dict[int, int] = {}
    for i, cost in enumerate(costs):
        costs[i], rows = chunked_cost(plan, i, cost, share, read_ahead > 0)
        if rows is not None:
            chunks[i] = rows
    memo: list[tuple[Rules, ChunkRules]] = []

    def stats() -> tuple[Rules, ChunkRules]:  # whole-model statistics, computed at most once
        if not memo:
            memo.append(_model_stat_rules(plan, threads, progress, chunks))
        return memo[0]

    def rules() -> Rules:
        return stats()[0]

    spec = Stream(
        outputs=[j.out for j in plan.jobs],
        metadata={
            "splice_recipe": recipe_yaml,
        },
        shard_bytes=shard_bytes,
        overwrite=overwrite,
        allow_nonfinite=plan.allow_nonfinite,
        side_files=_tokenizer_files(plan),
        resume=resume,
        fingerprint=fingerprint(plan, shard_bytes),
        input_check=InputCheck(plan, rules),
        threads=threads,
        memory_budget=memory_budget,
        cost=lambda i: costs[i],
        reads=None if read_ahead <= 0 else lambda i: runner.reads(i),
        read_ahead=max(read_ahead, 1),
        progress=progress,
        label="merging",
    )
    runner = _Runner(plan, Sources(plan.readers), {}, chunks)

    def before(pending: list[int]) -> None:
        rules_, per_chunk = stats() if pending else ({}, {})
        runner.rules, runner.chunk_rules = rules_, dict(per_chunk)

    old_threads = torch.get_num_threads()
    torch.set_num_threads(torch_threads_per_job(threads))
    try:
        with installed(ScratchPool(scratch_cap(memory_budget))):
            return write_stream(
                out_dir, spec, runner.sources, runner, before=before, extra_files=lambda: extra
            )
    finally:
        torch.set_num_threads(old_threads)


def scratch_cap(memory_budget: int) -> int:
    """Bytes of reused scratch storages a merge keeps (`splice.io.scratch`): half the
    budget."""
    return memory_budget // 2


def default_job_threads() -> int:
    """Jobs run at once by default (``--threads``): up to 4."""
    return min(4, os.cpu_count() or 1)


def torch_threads_per_job(threads: int) -> int:
    """torch's intra-op threads while ``threads`` jobs run: the cores shared out."""
    return max(1, (os.cpu_count() or 1) // threads)


def chunked_cost(
    plan: MergePlan, index: int, cost: int, share: int, ahead: bool
) -> tuple[int, int | None]:
    """Job ``index``'s estimated cost and rows per chunk (None: not chunked), given its
    unchunked ``cost`` (`job_cost`) and the budget ``share`` of a job in flight.

    A chunked job holds one chunk's merge (``cost`` × rows / all rows) and, with the read-ahead
    (``ahead``), the next chunk's inputs read meanwhile (`input_cost` × rows / all rows), so
    its rows are chosen for the two to fit the share. The mergekit dialect's whole-tensor
    selection, found when the job starts, peaks alone (its first chunk is read after it,
    `first_chunk_ahead`), and its packed masks (or a Gram / row-sum pre-pass's float64
    scratch) are held beside the rest (`tensor_pass_cost`): max(chunk + next chunk's
    inputs, selection peak) + held."""
    extra = input_cost(plan, index) if ahead else 0
    rows = rows_per_chunk(plan, index, cost, share, extra)
    if rows is None:
        return cost, None
    total = plan.jobs[index].out.shape[0]
    peak, held = tensor_pass_cost(plan, index, rows)
    chunk, following = -(-cost * rows // total), -(-extra * rows // total)
    return max(chunk + following, peak) + held, rows


def input_cost(plan: MergePlan, index: int) -> int:
    """Bytes of job ``index``'s inputs as held once read: each input in the compute dtype
    (or as stored when the file dtype is wider), plus one read buffer beside its conversion;
    a copy's tensor as stored. Part of `job_cost`; also what a chunk read ahead holds (pro
    rata of its rows)."""
    job = plan.jobs[index]
    if job.kind == "copy":
        return plan.readers[job.inputs[0].ref].info(job.inputs[0].name).nbytes
    size = plan.job_compute_dtype(job).itemsize
    numel = job.out.numel
    file_sizes = [plan.readers[s.ref].info(s.name).nbytes // max(numel, 1) for s in job.sources]
    cost = numel * sum(max(size, f) for f in file_sizes)
    return cost + numel * max(file_sizes, default=0)  # one read buffer beside its conversion


def job_cost(plan: MergePlan, index: int) -> int:
    """Approximate bytes a job holds at its peak, for the driver's memory budget.

    - Each input: its converted copy in the compute dtype, or its bytes as read when the file
      dtype is wider (the read buffer and its conversion coexist for one input at a time:
      one more input's file bytes).
    - Scratch: six tensors' worth (magnitudes, bit patterns, masks, sign, divisor, result),
      at least float32-wide per entry: the magnitude selection works on float32 magnitudes
      whatever the compute dtype.
    - mergekit dialect in float16 / bfloat16 (`_mergekit_precision`): the task-vector combine
      stacks the n deltas into one more tensor [n, ...] and keeps a bool agreement mask of
      the same length, on top of the inputs (mergekit's own arithmetic, bit for bit).

    Measured: a TIES job over 3 models peaks near 42 bytes per entry in float32; this
    estimate gives (4 + 6) x 4 = 40. A copy job holds its input only.
    """
    job = plan.jobs[index]
    cost = input_cost(plan, index)  # the inputs and one read buffer
    if job.kind == "copy":
        return cost
    cd = plan.job_compute_dtype(job)
    size = cd.itemsize
    numel = job.out.numel
    cost += numel * max(size, 4) * 6
    if plan.recipe.dialect == "mergekit" and cd in _LOW_PRECISION and plan.method.needs_base:
        cost += numel * (size + 1) * len(job.inputs)  # the stacked deltas and agreement mask
    if plan.data is not None:  # the statistics, in float64 at most (RegMean's solve)
        cost += 8 * plan.data.numel([s.name for s in job.inputs])
    return cost
