"""The driver's read-ahead (`splice.engine.prefetch`): reads in step order on one reader
thread, within the memory budget (a live-bytes account, not timing), the same outputs as
without it; `job_cost` of a mergekit bfloat16 TIES job; mapped conversions."""

from __future__ import annotations

import threading
import weakref

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import bf16_finetunes

from splice.engine import plan_merge, run_merge
from splice.engine.driver import Output, Sources, Stream, write_stream
from splice.engine.execute import job_cost
from splice.io import TensorInfo
from splice.io.finite import FiniteReader, NonFiniteError
from splice.io.mapped import read_as
from splice.io.safetensors_reader import SafetensorsReader
from splice.io.shard_record import input_digest
from splice.recipe.schema import parse_recipe

ENTRIES = 1000  # float32 entries per tensor: 4000 bytes


class CountingReader:
    """A reader of tensors named 't<step>.<k>' that logs each read (thread, name) and keeps
    a live-bytes account of what it handed out (freed when the tensor is)."""

    def __init__(self, account: Account) -> None:
        self.path = "fake"
        self.account = account
        self.log: list[tuple[str, str]] = []

    def names(self) -> list[str]:
        return []

    def info(self, name: str) -> TensorInfo:
        return TensorInfo(name, (ENTRIES,), torch.float32)

    def read(self, name: str) -> torch.Tensor:
        self.log.append((threading.current_thread().name, name))
        step = int(name[1:].split(".")[0])
        return self.account.new(torch.full((ENTRIES,), float(step)))

    def close(self) -> None:
        pass


class Account:
    """Live bytes of tracked tensors, and their peak."""

    def __init__(self) -> None:
        self.live = self.peak = 0
        self.lock = threading.Lock()

    def new(self, t: torch.Tensor) -> torch.Tensor:
        n = t.numel() * t.element_size()
        with self.lock:
            self.live += n
            self.peak = max(self.peak, self.live)
        weakref.finalize(t, self._free, n)
        return t

    def _free(self, n: int) -> None:
        with self.lock:
            self.live -= n


def _stream(tmp_path, steps: int, reads_per_step: int, **kw):
    account = Account()
    reader = CountingReader(account)
    sources = Sources({"m": reader})
    outputs = [TensorInfo(f"o{i}", (ENTRIES,), torch.float32) for i in range(steps)]
    reads = {i: [("m", f"t{i}.{k}", None) for k in range(reads_per_step)] for i in range(steps)}
    cost = (reads_per_step + 1) * ENTRIES * 4  # its inputs and its output
    return account, reader, sources, outputs, reads, cost


def test_read_ahead_reads_in_step_order_on_the_reader_thread_and_changes_no_output(tmp_path):
    account, reader, sources, outputs, reads, cost = _stream(tmp_path, 8, 3)

    def step(i: int) -> list[Output]:
        parts = [sources.read("m", n, {}) for _, n, _ in reads[i]]
        return [Output(f"o{i}", account.new(sum(parts) + i))]

    spec = Stream(
        outputs=outputs,
        metadata={},
        threads=2,
        read_ahead=3,
        cost=lambda i: cost,
        reads=lambda i: reads[i],
    )
    write_stream(tmp_path / "out", spec, sources, step)
    assert [n for _, n in reader.log] == [n for i in range(8) for _, n, _ in reads[i]]
    assert {t for t, _ in reader.log} == {"splice-read_0"}  # no worker read for itself
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        got = {n: f.get_tensor(n) for n in f.keys()}  # noqa: SIM118
    assert all(torch.equal(got[f"o{i}"], torch.full((ENTRIES,), 4.0 * i)) for i in range(8))


def test_read_ahead_stays_inside_the_memory_budget(tmp_path):
    """Budget for two steps: while step 0 waits, the reader may read step 1's inputs but
    not step 2's; the live bytes never exceed the budget."""
    account, reader, sources, outputs, reads, cost = _stream(tmp_path, 6, 2)
    step1_read = threading.Event()
    done: list[int] = []
    reads_seen_while_0_ran: list[str] = []

    def step(i: int) -> list[Output]:
        parts = [sources.read("m", n, {}) for _, n, _ in reads[i]]
        if i == 0:
            # the read-ahead must reach step 1 while step 0 still runs (overlap) ...
            for _ in range(1000):
                if sum(n.startswith("t1.") for _, n in reader.log) == 2:
                    step1_read.set()
                    break
                threading.Event().wait(0.01)
            reads_seen_while_0_ran.extend(n for _, n in reader.log)
        done.append(i)
        return [Output(f"o{i}", account.new(parts[0] + parts[1]))]

    spec = Stream(
        outputs=outputs,
        metadata={},
        threads=1,
        read_ahead=4,
        cost=lambda i: cost,
        reads=lambda i: reads[i],
        memory_budget=2 * cost + cost // 2,
    )
    write_stream(tmp_path / "out", spec, sources, step)
    assert step1_read.is_set()
    assert not any(n.startswith(("t2.", "t3.")) for n in reads_seen_while_0_ran)  # budget
    assert account.peak <= spec.memory_budget
    assert account.peak > cost  # two steps were live at once: the account can fail
    assert done == list(range(6))


def test_a_failed_read_ahead_fails_its_step_and_the_run(tmp_path):
    _, reader, sources, outputs, reads, cost = _stream(tmp_path, 4, 1)
    real = reader.read

    def read(name: str) -> torch.Tensor:
        if name == "t2.0":
            raise NonFiniteError("boom in t2.0")
        return real(name)

    reader.read = read  # type: ignore[method-assign]

    def step(i: int) -> list[Output]:
        return [Output(f"o{i}", sources.read("m", reads[i][0][1], {}))]

    spec = Stream(
        outputs=outputs, metadata={}, threads=2, cost=lambda i: cost, reads=lambda i: reads[i]
    )
    with pytest.raises(NonFiniteError, match=r"boom in t2\.0"):
        write_stream(tmp_path / "out", spec, sources, step)
    assert not (tmp_path / "out").exists()


def _ties(paths, dtype: str) -> dict:
    return {
        "merge_method": "ties",
        "base_model": paths["base"],
        "dtype": dtype,
        "models": [
            {"model": paths[f"ft{i}"], "parameters": {"weight": 1.0, "density": 0.5}}
            for i in range(3)
        ],
    }


def test_job_cost_counts_mergekits_stacked_deltas_in_bfloat16(tmp_path):
    """Per entry, 3 fine-tunes + base in bf16 files: bfloat16 compute holds the 4 inputs
    (2 B each), one read buffer (2), float32 selection scratch (6 x 4) and mergekit's stacked
    deltas plus agreement mask (3 x (2 + 1)): 43 B; float32 compute: 4 x 4 + 2 + 24 = 42 B."""
    paths = bf16_finetunes(tmp_path)
    for dtype, per_entry in (("bfloat16", 43), ("float32", 42)):
        plan = plan_merge(parse_recipe(_ties(paths, dtype)))
        try:
            i = next(k for k, j in enumerate(plan.jobs) if j.out.name == "lm_head.weight")
            assert job_cost(plan, i) == 16 * 8 * per_entry
        finally:
            plan.close()


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_merge_outputs_do_not_depend_on_read_ahead_or_threads(tmp_path, dtype):
    paths = bf16_finetunes(tmp_path)
    outs = []
    for k, (threads, ahead) in enumerate(((1, 0), (3, 4))):
        plan = plan_merge(parse_recipe(_ties(paths, dtype)))
        try:
            run_merge(
                plan,
                tmp_path / f"out{k}",
                threads=threads,
                read_ahead=ahead,
                progress=False,
                shard_bytes=700,
            )
        finally:
            plan.close()
        files = sorted((tmp_path / f"out{k}").glob("*.safetensors"))
        outs.append([f.read_bytes() for f in files])
    assert len(outs[0]) > 1 and outs[0] == outs[1]


def test_mapped_conversion_equals_read_then_convert_and_checks_the_stored_values(tmp_path):
    x = torch.randn(300, 7).to(torch.bfloat16)
    bad = torch.tensor([1.0, float("nan")], dtype=torch.bfloat16)
    save_file(
        {"pad": torch.ones(3, dtype=torch.int8), "x": x, "bad": bad},
        str(tmp_path / "m.safetensors"),
    )
    with SafetensorsReader(tmp_path / "m.safetensors") as r:
        t, sha = read_as(r, "x", torch.float32, digest=True)
        assert torch.equal(t, x.float()) and sha == input_digest(x)
        t.zero_()  # the caller's own tensor: the file is untouched
        assert torch.equal(r.read("x"), x)
        with pytest.raises(NonFiniteError, match="'bad'"):
            read_as(FiniteReader(r, "m"), "bad", torch.float32, digest=False)
