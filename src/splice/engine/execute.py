"""Execute a merge plan: streaming, threaded, bounded memory, atomic output, resumable.

Each job reads its inputs (one tensor per model), merges them in the compute dtype, casts
to the output dtype and hands the result to the sharded writer, which places it at its
pre-planned offset in its shard. Jobs run on a thread pool with at most ``threads + 1``
jobs in flight and at most ``memory_budget`` bytes of estimated job memory (inputs in the
compute dtype plus scratch; a larger job runs alone), so peak memory is about
max(budget, the largest job) plus the interpreter, independent of model size. Reading
(pread), computing (torch) and writing (pwrite) all release the GIL, so they overlap.

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
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

import splice
from splice.engine.layers import layer_index
from splice.engine.plan import MergePlan, TensorJob
from splice.engine.resume_check import InputCheck, Rules, rules_digest, source_key, stats_key
from splice.engine.topk import keep_rules
from splice.errors import CheckpointError
from splice.io import ShardedWriter, model_dir_of, plan_shards
from splice.io.finite import numerical_errors
from splice.io.open import model_side_files, split_reference
from splice.io.safe_paths import member
from splice.io.shard_record import input_digest
from splice.io.textfile import load_json_object
from splice.merge import KeepRule, MergeContext
from splice.merge.methods.lines import lines_scale

_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass
class MergeReport:
    out_dir: Path
    tensors: int
    skipped: int  # tensors already done in a resumed run
    bytes_read: int
    bytes_written: int
    seconds: float


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
        ],
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


class _Runner:
    def __init__(
        self, plan: MergePlan, writer: ShardedWriter, rules: dict[int, dict[str, KeepRule]]
    ):
        self.plan = plan
        self.writer = writer
        self.rules = rules
        self.bytes_read = 0
        self.lock = threading.Lock()
        # The output's layer count, for methods that scale by depth (LiNeS).
        indices = [i for i in (layer_index(j.out.name) for j in plan.jobs) if i is not None]
        self.num_layers = plan.num_layers_out or (1 + max(indices) if indices else None)

    def read(self, job: TensorJob, which: int | None, seen: dict[str, str]) -> torch.Tensor:
        """Read one input; its digest goes into `seen` (the shard's record, for --resume)."""
        src = job.base if which is None else job.inputs[which]
        assert src is not None
        t = self.plan.readers[src.ref].read(src.name)
        seen[source_key(src.ref, src.name)] = input_digest(t)
        with self.lock:
            self.bytes_read += t.numel() * t.element_size()
        return t

    def __call__(self, index: int) -> int:
        job = self.plan.jobs[index]
        seen: dict[str, str] = {}
        if job.kind == "copy":
            out = self.read(job, 0, seen)
        else:
            cd = self.plan.compute_dtype
            base = self.read(job, None, seen).to(cd) if job.base else None
            tensors = [self.read(job, i, seen).to(cd) for i in range(len(job.inputs))]
            if self.rules.get(index):
                seen[stats_key(job.out.name)] = rules_digest(self.rules[index])
            ctx = MergeContext(
                tensor_name=job.out.name,
                seed=self.plan.recipe.seed,
                dialect=self.plan.recipe.dialect,
                model_stats=self.rules.get(index, {}),
                layer_index=layer_index(job.out.name),
                num_layers=self.num_layers,
            )
            post = self.plan.recipe.lines
            # Methods may modify their inputs in place: the post-step keeps its own base.
            kept = base.clone() if post is not None and base is not None else None
            with numerical_errors(f"tensor '{job.out.name}': method '{self.plan.method.name}'"):
                out = self.plan.method(base, tensors, ctx, **job.params)
            if kept is not None:
                assert post is not None
                s = lines_scale(post.alpha, post.beta, ctx.layer_index, ctx.num_layers)
                out = kept.add_(out.to(cd).sub_(kept), alpha=s)
            del base, tensors, kept
        out = out.to(job.out.dtype).contiguous()
        self.writer.write(job.out.name, out, inputs=seen, allow_nonfinite=self.plan.allow_nonfinite)
        return out.numel() * out.element_size()


def _model_stat_rules(plan: MergePlan, threads: int, progress: bool) -> Rules:
    """Whole-model statistics (two extra passes) when the method asks for them."""
    requests = plan.stat_requests
    merge_jobs = [i for i, j in enumerate(plan.jobs) if j.kind == "merge"]
    if not requests:
        return {}
    cd = plan.compute_dtype

    def magnitudes(i: int) -> list[torch.Tensor]:
        job = plan.jobs[i]
        base = plan.readers[job.base.ref].read(job.base.name).to(cd) if job.base else None
        out = []
        for r in requests:
            x = plan.readers[job.inputs[r.model_index].ref].read(job.inputs[r.model_index].name)
            x = x.to(cd)
            if r.of_delta and base is not None:
                x = x - base
            out.append(x.abs().float())
        return out

    bars: list[tqdm] = []

    def bar(label: str) -> Callable[[], None]:
        b = tqdm(
            total=len(merge_jobs), desc=label, unit="tensor", disable=not progress, leave=False
        )
        bars.append(b)
        return lambda: b.update(1)

    try:
        # The statistic spans all merged tensors, also those a resumed run has done.
        return keep_rules(
            requests,
            merge_jobs,
            lambda i: plan.jobs[i].out.numel,
            magnitudes,
            threads=threads,
            progress=bar,
        )
    finally:
        for b in bars:
            b.close()


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
) -> MergeReport:
    """Run a planned merge into ``out_dir`` (HF folder: shards, index, config, tokenizer).

    ``memory_budget`` caps the estimated memory of the jobs in flight (see `job_cost`);
    a single job larger than it still runs, alone. ``overwrite``: 0 refuses an existing
    ``out_dir``, 1 replaces a previous splice output holding no input, 2 any folder.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    threads = threads or min(4, os.cpu_count() or 1)
    recipe_yaml = recipe_text or yaml.safe_dump(
        plan.recipe.model_dump(mode="json", exclude_defaults=True), sort_keys=False
    )
    metadata = {
        "format": "pt",
        "splice_version": splice.__version__,
        "splice_recipe": recipe_yaml,
    }
    config_json = _config_json(plan)  # side inputs first: no output if one is bad
    tokenizer_files = _tokenizer_files(plan)
    shards = plan_shards([j.out for j in plan.jobs], shard_bytes)
    writer = ShardedWriter(
        out_dir,
        shards,
        metadata,
        resume=resume,
        fingerprint=fingerprint(plan, shard_bytes),
        overwrite=overwrite,
        inputs=list(plan.readers),
    )
    memo: list[Rules] = []

    def rules() -> Rules:  # whole-model statistics, computed at most once
        if not memo:
            memo.append(_model_stat_rules(plan, threads, progress))
        return memo[0]

    old_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // threads))
    try:
        if resume:
            writer.drop_shards(InputCheck(plan, rules))
        done = writer.completed_tensors()
        pending = [i for i, j in enumerate(plan.jobs) if j.out.name not in done]
        runner = _Runner(plan, writer, rules() if pending else {})
        written = _run_jobs(
            runner,
            pending,
            threads,
            progress,
            sum(plan.jobs[i].out.nbytes for i in pending),
            memory_budget,
        )
        extra = {"splice_recipe.yaml": recipe_yaml.encode()}
        if config_json is not None:
            extra["config.json"] = config_json
        writer.finalize(extra_files=extra, copy_files=tokenizer_files)
    except BaseException:
        writer.abort()
        raise
    finally:
        torch.set_num_threads(old_threads)
    return MergeReport(
        out_dir=out_dir,
        tensors=len(pending),
        skipped=len(done),
        bytes_read=runner.bytes_read,
        bytes_written=written,
        seconds=time.perf_counter() - start,
    )


def job_cost(plan: MergePlan, index: int) -> int:
    """Approximate bytes a job holds at its peak: its inputs in the compute dtype plus six
    tensors' worth of scratch (magnitudes, bit patterns, masks, sign, divisor, result).
    Measured: a TIES job over 3 models peaks near 42 bytes per entry in float32; this
    estimate gives (4 + 6) x 4 = 40."""
    job = plan.jobs[index]
    size = torch.empty((), dtype=plan.compute_dtype).element_size()
    return job.out.numel * size * (len(job.sources) + 6)


def _run_jobs(
    runner: _Runner,
    pending: list[int],
    threads: int,
    progress: bool,
    total_bytes: int,
    memory_budget: int,
) -> int:
    """Run jobs in plan order: at most threads + 1 in flight, and no more than
    `memory_budget` bytes of estimated job memory (a job larger than the budget runs alone)."""
    written = 0
    t0 = time.perf_counter()
    bar = tqdm(total=len(pending), desc="merging", unit="tensor", disable=not progress)
    in_flight: dict[Future[int], int] = {}
    queue = deque(pending)
    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:

            def top_up() -> None:
                while queue and len(in_flight) <= threads:
                    cost = job_cost(runner.plan, queue[0])
                    if in_flight and sum(in_flight.values()) + cost > memory_budget:
                        return
                    in_flight[pool.submit(runner, queue.popleft())] = cost

            top_up()
            while in_flight:
                finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for f in finished:
                    del in_flight[f]
                    written += f.result()  # re-raises a job's error
                    bar.update(1)
                elapsed = max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix_str(
                    f"read {runner.bytes_read / elapsed / 1e6:.0f} MB/s, "
                    f"wrote {written / 1e6:.0f}/{total_bytes / 1e6:.0f} MB",
                    refresh=False,
                )
                top_up()
    except BaseException:
        for f in in_flight:
            f.cancel()
        raise
    finally:
        bar.close()
    return written
