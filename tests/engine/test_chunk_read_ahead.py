"""Row chunks read ahead (`splice.engine.chunks.merged_rows`): a chunked job's next chunk is
read on the reader thread while the current one is merged; the files are those of the
unchunked merge and of chunks read on the worker (no read-ahead), bit for bit; the job's
cost counts the chunk read ahead; the reads of a failed job are dropped; a chunk's rows are
converted from their mapped pages."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import bf16_finetunes

from splice.engine import chunks as chunks_mod
from splice.engine import execute as execute_mod
from splice.engine import plan_merge, run_merge
from splice.engine.driver import Sources
from splice.engine.execute import chunked_cost, input_cost, job_cost
from splice.engine.prefetch import Call, Prefetcher
from splice.io.finite import FiniteReader, NonFiniteError
from splice.io.mapped import read_rows_as
from splice.io.safetensors_reader import SafetensorsReader
from splice.io.shard_record import input_digest, input_hasher
from splice.io.writer import ShardedWriter
from splice.recipe.schema import parse_recipe


def _recipe(paths: dict[str, str], method: str) -> dict:
    """mergekit TIES (per-tensor keep masks), splice DARE-TIES (seeded drop at each chunk's
    flat offset), task arithmetic with LiNeS (depth-scaled)."""
    models = [
        {"model": paths[f"ft{i}"], "parameters": {"weight": w, "density": d}}
        for i, (w, d) in enumerate(((1.0, 0.2), (0.8, 0.3), (0.6, 0.5)))
    ]
    if method == "ties":
        return {"merge_method": "ties", "base_model": paths["base"], "models": models}
    if method == "dare_ties":
        return {"method": "dare_ties", "base_model": paths["base"], "models": models, "seed": 3}
    for m in models:
        del m["parameters"]["density"]
    return {
        "method": "task_arithmetic",
        "base_model": paths["base"],
        "models": models,
        "lines": {"alpha": 0.5, "beta": 0.5},
    }


class _Spy:
    """Logs every chunk read (tensor, rows, thread), every chunk read scheduled ahead and
    every chunk merged (in ``events``: tensor, what, first row), the rows of every chunked
    write, and keeps a live count of the tensors the chunk reads handed out."""

    def __init__(self, monkeypatch) -> None:
        self.reads: list[tuple[str, tuple[int, int], str]] = []
        self.events: list[tuple[str, str, int]] = []
        self.writes: dict[str, list[int]] = {}
        self.live = 0
        self._lock = threading.Lock()
        real_read, real_rows = chunks_mod.read_chunk, ShardedWriter.write_rows
        real_ahead, real_merge = Sources.ahead, execute_mod._Runner._merge

        def ahead(sources, call):
            _, plan, index, span, _ = call.fn.args
            self.events.append((plan.jobs[index].out.name, "ahead", span[0]))
            real_ahead(sources, call)

        def merge(runner, index, read, stats=None, offset=0):
            out = runner.plan.jobs[index].out
            self.events.append((out.name, "merge", offset // (out.numel // out.shape[0])))
            return real_merge(runner, index, read, stats, offset)

        def read_chunk(sources, plan, index, span, hashers=None):
            parts, hashers = real_read(sources, plan, index, span, hashers)
            name = plan.jobs[index].out.name
            with self._lock:
                self.reads.append((name, span, threading.current_thread().name))
                self.live += len(parts)
            for p in parts:
                weakref.finalize(p, self._free)
            return parts, hashers

        def write_rows(writer, name, **k):
            rows = real_rows(writer, name, **k)
            write = rows.write
            rows.write = lambda c: (self.writes.setdefault(name, []).append(c.shape[0]), write(c))[
                1
            ]
            return rows

        monkeypatch.setattr(chunks_mod, "read_chunk", read_chunk)
        monkeypatch.setattr(Sources, "ahead", ahead)
        monkeypatch.setattr(execute_mod._Runner, "_merge", merge)
        monkeypatch.setattr(ShardedWriter, "write_rows", write_rows)

    def _free(self) -> None:
        with self._lock:
            self.live -= 1


def _run(recipe: dict, out, **kw) -> None:
    plan = plan_merge(parse_recipe(recipe))
    try:
        run_merge(plan, out, progress=False, shard_bytes=700, **kw)
    finally:
        plan.close()


def _files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic"])
def test_chunks_read_ahead_give_the_unchunked_files_and_the_worker_read_ones(
    tmp_path, monkeypatch, method
):
    """Three runs of one recipe: unchunked; chunked with each chunk's rows read on the
    reader thread (the first at admission, each next one while the chunk before is
    merged); chunked with the rows read on the worker (``read_ahead=0``, the path before
    the read-ahead). The three output folders are the same bytes (shards, index with its
    input digests for --resume, config)."""
    recipe = _recipe(bf16_finetunes(tmp_path), method)
    _run(recipe, tmp_path / "whole")
    spy = _Spy(monkeypatch)
    _run(recipe, tmp_path / "ahead", threads=1, memory_budget=2048)
    ahead_reads, ahead_writes, events = list(spy.reads), dict(spy.writes), list(spy.events)
    spy.reads.clear()
    spy.writes.clear()
    spy.events.clear()
    _run(recipe, tmp_path / "worker", threads=1, memory_budget=2048, read_ahead=0)
    monkeypatch.undo()
    whole = _files(tmp_path / "whole")
    assert len(whole) > 3
    assert _files(tmp_path / "ahead") == whole
    assert _files(tmp_path / "worker") == whole
    # both lm_head and the embedding were chunked, every chunk read once, in row order, and
    # each next chunk's read was started before the chunk before it was merged
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        rows = ahead_writes[name]
        assert len(rows) > 1 and sum(rows) == 16
        starts = [sum(rows[:k]) for k in range(len(rows))]
        spans = [s for n, s, _ in ahead_reads if n == name]
        assert spans == [(a, a + r) for a, r in zip(starts, rows, strict=True)]
        order = [(what, row) for n, what, row in events if n == name]
        assert [r for w, r in order if w == "merge"] == starts
        assert [r for w, r in order if w == "ahead"] == starts[1:]
        for k in range(len(starts) - 1):
            assert order.index(("ahead", starts[k + 1])) < order.index(("merge", starts[k]))
    if method == "ties":  # the whole-tensor selection first: its first chunk is read after
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            first = next(t for n, _, t in ahead_reads if n == name)
            assert not first.startswith("splice-read")
    assert spy.reads and not any(t.startswith("splice-read") for _, _, t in spy.reads)
    assert spy.live == 0  # every chunk read was let go


def test_a_chunked_jobs_cost_counts_the_chunk_read_ahead(tmp_path, monkeypatch, models):
    """float32 files, float32 TIES over base + 3 models, lm_head 16 x 8 = 128 entries:
    inputs 4 x 4 B + one 4 B read buffer = 20 B an entry (2560), the job 20 + 6 x 4 = 44 B
    (5632). One worker, two jobs ahead, a 6144 B budget: a share of 2048 B. With the
    read-ahead a chunk of r rows costs its merge 5632 r / 16 plus the next chunk's inputs
    2560 r / 16, 512 r: r = 4 (1408 + 640 = 2048); without it (read_ahead=0: a share of
    6144 / 2 = 3072) r = 8 (2816). The mergekit dialect first selects over the whole tensor
    and reads the first chunk after it: the larger of the selection's peak and a chunk with
    the next one's inputs, plus the three packed masks held, 3 x 16. The compiled selection
    peaks at 8 x 128 + 16 = 1040: 2048 + 48 = 2096; selecting on the whole δ, at (4 + 9) x
    128 = 1664 (over a chunk's merge, 1408, but not beside the next chunk's inputs):
    2096 too, where a first chunk read ahead during the selection would make it
    1664 + 640 + 48 = 2352."""
    if not chunks_mod.pairs_selectable(128):
        pytest.skip("the compiled selection is not built")
    models_ = [
        {"model": models[f"ft{i}"], "parameters": {"weight": 1.0, "density": 0.5}} for i in range(3)
    ]
    splice_ties = {
        "method": "ties",
        "base_model": models["base"],
        "models": models_,
        "parameters": {"scope": "tensor"},
    }
    mergekit_ties = {"merge_method": "ties", "base_model": models["base"], "models": models_}
    seen: list = []
    real = execute_mod.write_stream

    def spy(out_dir, spec, *a, **k):
        seen.append(spec)
        return real(out_dir, spec, *a, **k)

    monkeypatch.setattr(execute_mod, "write_stream", spy)
    for run, (recipe, ahead, want_cost, want_rows, pairs) in enumerate(
        (
            (splice_ties, 2, 2048, 4, True),
            (splice_ties, 0, 2816, 8, True),
            (mergekit_ties, 2, 2096, 4, True),
            (mergekit_ties, 2, 2096, 4, False),
        )
    ):
        if not pairs:
            monkeypatch.setattr(chunks_mod, "pairs_selectable", lambda n: False)
        plan = plan_merge(parse_recipe(recipe))
        try:
            i = next(k for k, j in enumerate(plan.jobs) if j.out.name == "lm_head.weight")
            assert (job_cost(plan, i), input_cost(plan, i)) == (5632, 2560)
            share = 6144 // (1 + max(ahead, 1))
            assert chunked_cost(plan, i, 5632, share, ahead > 0) == (want_cost, want_rows)
            seen.clear()
            run_merge(
                plan,
                tmp_path / f"out{run}",
                threads=1,
                read_ahead=ahead,
                memory_budget=6144,
                progress=False,
            )
            assert seen[0].cost(i) == want_cost  # what the driver admits the job at
        finally:
            plan.close()


def test_a_failed_chunked_job_drops_its_read_ahead(tmp_path, monkeypatch):
    """The method fails on lm_head's second chunk: the run fails with no output; the chunk
    read ahead meanwhile (the third) is dropped, no chunk after it is read, and every
    tensor the chunk reads handed out is let go."""
    paths = bf16_finetunes(tmp_path)
    recipe = _recipe(paths, "task_arithmetic")
    spy = _Spy(monkeypatch)
    real = execute_mod._Runner._merge

    def failing(self, index, read, stats=None, offset=0):
        if self.plan.jobs[index].out.name == "lm_head.weight" and offset > 0:
            raise RuntimeError("boom in lm_head's second chunk")
        return real(self, index, read, stats, offset)

    monkeypatch.setattr(execute_mod._Runner, "_merge", failing)
    with pytest.raises(RuntimeError, match="boom"):
        _run(recipe, tmp_path / "out", threads=1, memory_budget=2048)
    monkeypatch.undo()
    assert not (tmp_path / "out").exists()
    spans = [s for n, s, _ in spy.reads if n == "lm_head.weight"]
    rows = spy.writes["lm_head.weight"]
    assert len(rows) == 1  # only the first chunk was written
    r = rows[0]
    # chunks 0 and 1, and chunk 2 unless it was cancelled before it started
    assert spans in ([(0, r), (r, 2 * r)], [(0, r), (r, 2 * r), (2 * r, 3 * r)])
    gc.collect()
    assert spy.live == 0


def test_the_reads_of_a_dropped_step_are_cancelled_or_let_go():
    """One reader thread, held busy by step 1's call: step 2's queued call is cancelled by
    ``drop(2)`` (never runs, nothing to take); a call already done is let go."""
    release = threading.Event()
    ran: list[str] = []
    prefetcher = Prefetcher(lambda ref, name, dt: (torch.zeros(1), None))
    try:
        prefetcher.schedule(1, [Call("a", lambda: (release.wait(5), ran.append("a"))[1])])
        prefetcher.schedule(2, [Call("b", lambda: ran.append("b")), ("m", "t", None)])
        prefetcher.drop(2)
        assert prefetcher.take(2, "b") is None and prefetcher.take(2, ("m", "t", None)) is None
        release.set()
        future = prefetcher.take(1, "a")
        assert future is not None
        future.result()
        done = Call("c", lambda: ran.append("c") or "c")
        prefetcher.schedule(3, [done])
        prefetcher.schedule(4, [Call("d", lambda: "d")])
        assert prefetcher.take(4, "d").result() == "d"  # step 3's call ran before it
        prefetcher.drop(3)
        assert prefetcher.take(3, "c") is None
    finally:
        prefetcher.close()
    assert ran == ["a", "c"]


def test_mapped_row_conversion_equals_read_rows_then_convert_and_checks_the_stored_rows(
    tmp_path,
):
    """`read_rows_as` converts a chunk's rows from their mapped pages: the rows of the
    tensor converted, the running digest of the chunks the tensor's `input_digest`, the
    file untouched by a write to the result, and a `FiniteReader` refusing only the rows
    that hold a NaN."""
    x = torch.randn(300, 7).to(torch.bfloat16)
    bad = torch.ones(6, 3, dtype=torch.bfloat16)
    bad[4, 1] = float("nan")
    save_file({"pad": torch.ones(3, dtype=torch.int8), "x": x, "bad": bad}, str(tmp_path / "m"))
    with SafetensorsReader(tmp_path / "m") as r:
        for dtype, want in ((torch.float32, x.float()), (None, x)):
            h = input_hasher(torch.bfloat16, (300, 7))
            got = [
                read_rows_as(r, "x", a, b, dtype, h) for a, b in ((0, 100), (100, 299), (299, 300))
            ]
            assert torch.equal(torch.cat(got), want) and h.hexdigest() == input_digest(x)
            got[0].zero_()
            assert torch.equal(r.read_rows("x", 0, 100), x[:100])
        checked = FiniteReader(r, "m")
        assert torch.equal(read_rows_as(checked, "bad", 0, 4, torch.float32), bad[:4].float())
        with pytest.raises(NonFiniteError, match="'bad'"):
            read_rows_as(checked, "bad", 3, 5, torch.float32)
