import json
import random
import threading
from pathlib import Path

import pytest
import torch
import xxhash
from io_test_util import DTYPES, bit_equal, sample
from safetensors import safe_open
from safetensors.torch import load_file

from splice.errors import CheckpointError
from splice.io import SafetensorsReader, ShardedWriter, TensorInfo, plan_shards
from splice.io.output_folder import MARKER_NAME
from splice.io.writer import partial_dir_of
from splice.reference import open_checkpoint


def _tensors() -> dict[str, torch.Tensor]:
    out = {}
    for i, dt in enumerate(DTYPES):
        out[f"layer.{i}.w"] = sample((7, 3), dt, seed=i)  # odd sizes: alignment matters
        out[f"layer.{i}.b"] = sample((5,), dt, seed=100 + i)
    out["scalar"] = torch.tensor(2.5, dtype=torch.bfloat16)
    out["empty"] = torch.empty(0, 3)
    return out


def _infos(tensors):
    return [TensorInfo(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]


def _write_all(writer, tensors, threads=4, seed=0):
    names = list(tensors)
    random.Random(seed).shuffle(names)
    chunks = [names[i::threads] for i in range(threads)]
    errors = []

    def work(chunk):
        try:
            for n in chunk:
                writer.write(n, tensors[n])
        except BaseException as e:  # pragma: no cover - surfaced below
            errors.append(e)

    ts = [threading.Thread(target=work, args=(c,)) for c in chunks]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors


@pytest.mark.parametrize("budget", [10**9, 100])
def test_round_trip_random_thread_order(tmp_path, budget):
    tensors = _tensors()
    shards = plan_shards(_infos(tensors), budget)
    out = tmp_path / "out"
    w = ShardedWriter(out, shards, {"format": "pt", "note": "ünïcode"})
    _write_all(w, tensors)
    assert not out.exists()
    w.finalize(extra_files={"config.json": b"{}"})
    assert not partial_dir_of(out).exists()

    files = sorted(p.name for p in out.iterdir())
    if len(shards) == 1:
        assert files == ["config.json", "model.safetensors", MARKER_NAME]
    else:
        assert "model.safetensors.index.json" in files
        assert f"model-00001-of-{len(shards):05d}.safetensors" in files

    loaded = {}
    for shard in shards:
        path = out / shard.filename
        loaded.update(load_file(str(path)))  # the official library accepts every shard
        with safe_open(str(path), "pt") as f:
            assert f.metadata() == {"format": "pt", "note": "ünïcode"}
        with SafetensorsReader(path) as r:
            for name in r.names():
                assert bit_equal(r.read(name), tensors[name]), name
                begin, _ = r.byte_range(name)
                assert begin % tensors[name].element_size() == 0, name
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert bit_equal(loaded[name], t), name

    reader = open_checkpoint(str(out))
    assert sorted(reader.names()) == sorted(tensors)
    for name, t in tensors.items():
        assert bit_equal(reader.read(name), t)


def test_tensors_are_aligned_to_their_element_size(tmp_path):
    tensors = {
        "u8": torch.ones(3, dtype=torch.uint8),
        "f32": torch.ones(5),
        "f64": torch.ones(1, dtype=torch.float64),
    }
    shards = plan_shards(_infos(tensors), 10**9)
    w = ShardedWriter(tmp_path / "out", shards, {})
    _write_all(w, tensors, threads=1)
    w.finalize()
    r = SafetensorsReader(tmp_path / "out" / "model.safetensors")
    for name in tensors:
        begin, _ = r.byte_range(name)
        assert begin % tensors[name].element_size() == 0, name


def test_plan_shards_greedy_in_order():
    mk = lambda n, k: TensorInfo(n, (k,), torch.float32)  # noqa: E731  k floats = 4k bytes
    infos = [mk("a", 10), mk("b", 10), mk("c", 30), mk("d", 5), mk("e", 5), mk("f", 1)]
    plans = plan_shards(infos, 80)
    assert [[t.name for t in p.tensors] for p in plans] == [["a", "b"], ["c"], ["d", "e", "f"]]
    assert [p.filename for p in plans] == [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
    ]
    assert plans[0].offsets == ((0, 40), (40, 80))
    assert plans[1].data_bytes == 120  # larger than the budget: its own shard
    single = plan_shards(infos, 10**6)
    assert len(single) == 1 and single[0].filename == "model.safetensors"
    assert plan_shards([], 10)[0].filename == "model.safetensors"
    with pytest.raises(ValueError, match="twice"):
        plan_shards([mk("a", 1), mk("a", 1)], 10)
    with pytest.raises(ValueError, match="at least 1"):
        plan_shards(infos, 0)


def test_index_file(tmp_path):
    tensors = {f"t{i}": torch.full((10,), float(i)) for i in range(5)}
    shards = plan_shards(_infos(tensors), 80)
    w = ShardedWriter(tmp_path / "out", shards, {"format": "pt"})
    _write_all(w, tensors)
    w.finalize()
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_size": 5 * 40}
    assert index["weight_map"] == {
        "t0": "model-00001-of-00003.safetensors",
        "t1": "model-00001-of-00003.safetensors",
        "t2": "model-00002-of-00003.safetensors",
        "t3": "model-00002-of-00003.safetensors",
        "t4": "model-00003-of-00003.safetensors",
    }
    # transformers-style loading through our sharded reader agrees
    r = open_checkpoint(str(tmp_path / "out"))
    assert r.names() == list(tensors)


def test_shard_renamed_when_complete(tmp_path):
    tensors = {"a": torch.ones(10), "b": torch.ones(10), "c": torch.ones(10)}
    shards = plan_shards(_infos(tensors), 80)
    w = ShardedWriter(tmp_path / "out", shards, {})
    tmp = partial_dir_of(tmp_path / "out")
    first = shards[0].filename
    assert (tmp / (first + ".partial")).exists()
    w.write("a", tensors["a"])
    assert not (tmp / first).exists() and w.completed_tensors() == set()
    w.write("b", tensors["b"])
    assert (tmp / first).exists() and not (tmp / (first + ".partial")).exists()
    assert w.completed_tensors() == {"a", "b"}


def test_write_checks_dtype_shape_name_and_duplicates(tmp_path):
    tensors = {"a": torch.ones(2, 3), "b": torch.ones(4)}
    w = ShardedWriter(tmp_path / "out", plan_shards(_infos(tensors), 10**6), {})
    with pytest.raises(ValueError, match=r"planned torch.float32 \[2, 3\], got torch.float16"):
        w.write("a", torch.ones(2, 3, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"got torch.float32 \[3, 2\]"):
        w.write("a", torch.ones(3, 2))
    with pytest.raises(ValueError, match="not in the output plan"):
        w.write("zzz", torch.ones(1))
    w.write("a", tensors["a"])
    with pytest.raises(ValueError, match="written twice"):
        w.write("a", tensors["a"])
    with pytest.raises(RuntimeError, match="never written: b"):
        w.finalize()


def test_non_contiguous_input_is_written_correctly(tmp_path):
    t = torch.arange(12.0).reshape(3, 4)
    w = ShardedWriter(
        tmp_path / "out", plan_shards([TensorInfo("t", (4, 3), torch.float32)], 10**6), {}
    )
    w.write("t", t.T)
    w.finalize()
    assert torch.equal(load_file(str(tmp_path / "out" / "model.safetensors"))["t"], t.T)


def test_nothing_at_out_dir_until_finalize_and_failure_leaves_none(tmp_path):
    tensors = {f"t{i}": torch.randn(10) for i in range(4)}
    out = tmp_path / "out"
    shards = plan_shards(_infos(tensors), 80)

    def run():
        with ShardedWriter(out, shards, {}) as w:
            for i, (n, t) in enumerate(tensors.items()):
                assert not out.exists()
                if i == 2:
                    raise RuntimeError("boom midway")
                w.write(n, t)

    with pytest.raises(RuntimeError, match="boom"):
        run()
    assert not out.exists()
    assert partial_dir_of(out).exists()  # left for --resume


def test_finalize_copies_files_and_checks_names(tmp_path):
    tok = tmp_path / "tokenizer.json"
    tok.write_text('{"tok": 1}')
    tensors = {"a": torch.ones(2)}
    w = ShardedWriter(tmp_path / "out", plan_shards(_infos(tensors), 10**6), {})
    w.write("a", tensors["a"])
    with pytest.raises(CheckpointError, match="clashes"):
        w.finalize(extra_files={"model.safetensors": b"x"})
    with pytest.raises(CheckpointError, match="not a plain file name"):
        w.finalize(extra_files={"../evil": b"x"})
    with pytest.raises(
        CheckpointError, match=r"cannot copy into the output: .*missing\.json does not exist"
    ):
        w.finalize(copy_files=[tmp_path / "missing.json"])
    w.finalize(extra_files={"splice_recipe.yaml": b"a: 1\n"}, copy_files=[tok])
    out = tmp_path / "out"
    assert (out / "tokenizer.json").read_text() == '{"tok": 1}'
    assert (out / "splice_recipe.yaml").read_bytes() == b"a: 1\n"
    assert not (out / "fingerprint").exists()


def test_existing_out_dir_refused_at_construction(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    shards = plan_shards([TensorInfo("a", (2,), torch.float32)], 10**6)
    with pytest.raises(CheckpointError, match=r"already exists.*--overwrite"):
        ShardedWriter(out, shards, {})
    assert not partial_dir_of(out).exists()  # refused before any work
    with pytest.raises(CheckpointError, match=r"not written by splice.*--overwrite twice"):
        ShardedWriter(out, shards, {}, overwrite=True)  # not a splice output
    assert not partial_dir_of(out).exists()
    w = ShardedWriter(out, shards, {}, overwrite=2)
    w.write("a", torch.ones(2))
    assert (out / "old.txt").exists()  # untouched until finalize
    w.finalize()
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", MARKER_NAME]
    assert not out.with_name("out.splice-old").exists()


def test_out_dir_is_a_file(tmp_path):
    (tmp_path / "out").write_text("x")
    shards = plan_shards([TensorInfo("a", (2,), torch.float32)], 10**6)
    with pytest.raises(CheckpointError, match="not a folder"):
        ShardedWriter(tmp_path / "out", shards, {}, overwrite=True)


def _resume_setup(tmp_path):
    tensors = {
        f"t{i}": torch.randn(10, generator=torch.Generator().manual_seed(i)) for i in range(6)
    }
    shards = plan_shards(_infos(tensors), 80)  # 3 shards of 2
    return tensors, shards, tmp_path / "out"


def test_resume_keeps_completed_shards(tmp_path):
    tensors, shards, out = _resume_setup(tmp_path)
    w = ShardedWriter(out, shards, {"format": "pt"}, fingerprint="recipe-1")
    for n in ["t0", "t1", "t2"]:  # shard 1 complete, shard 2 half done
        w.write(n, tensors[n])
    w.abort()
    tmp = partial_dir_of(out)
    done_file = tmp / shards[0].filename
    mtime = done_file.stat().st_mtime_ns

    w2 = ShardedWriter(out, shards, {"format": "pt"}, resume=True, fingerprint="recipe-1")
    assert w2.completed_tensors() == {"t0", "t1"}
    assert done_file.stat().st_mtime_ns == mtime  # kept, not rewritten
    with pytest.raises(ValueError, match="written twice"):
        w2.write("t0", tensors["t0"])
    for n in ["t2", "t3", "t4", "t5"]:
        w2.write(n, tensors[n])
    w2.finalize()
    r = open_checkpoint(str(out))
    for n, t in tensors.items():
        assert torch.equal(r.read(n), t)


def test_resume_redoes_a_damaged_complete_shard(tmp_path):
    tensors, shards, out = _resume_setup(tmp_path)
    w = ShardedWriter(out, shards, {}, fingerprint="f")
    for n in ["t0", "t1", "t2", "t3"]:
        w.write(n, tensors[n])
    w.abort()
    damaged = partial_dir_of(out) / shards[1].filename
    damaged.write_bytes(damaged.read_bytes()[:-3])
    w2 = ShardedWriter(out, shards, {}, resume=True, fingerprint="f")
    assert w2.completed_tensors() == {"t0", "t1"}


def test_resume_with_other_fingerprint_is_refused(tmp_path):
    tensors, shards, out = _resume_setup(tmp_path)
    w = ShardedWriter(out, shards, {}, fingerprint="recipe-1")
    w.write("t0", tensors["t0"])
    w.abort()
    with pytest.raises(
        CheckpointError, match=r"cannot resume.*delete that folder or run without --resume"
    ):
        ShardedWriter(out, shards, {}, resume=True, fingerprint="recipe-2")
    other_plan = plan_shards(_infos(tensors), 40)
    with pytest.raises(CheckpointError, match="cannot resume"):
        ShardedWriter(out, other_plan, {}, resume=True, fingerprint="recipe-1")


def test_no_resume_starts_fresh(tmp_path):
    tensors, shards, out = _resume_setup(tmp_path)
    w = ShardedWriter(out, shards, {}, fingerprint="a")
    w.write("t0", tensors["t0"])
    w.write("t1", tensors["t1"])
    w.abort()
    (partial_dir_of(out) / "junk").write_text("x")
    w2 = ShardedWriter(out, shards, {}, fingerprint="b")
    assert w2.completed_tensors() == set()
    assert not (partial_dir_of(out) / "junk").exists()


def test_resume_without_partial_folder_starts_fresh(tmp_path):
    tensors, shards, out = _resume_setup(tmp_path)
    w = ShardedWriter(out, shards, {}, resume=True, fingerprint="a")
    assert w.completed_tensors() == set()
    _write_all(w, tensors)
    w.finalize()
    assert Path(out, "model.safetensors.index.json").exists()


def test_shard_record_holds_xxh3_128_digests_of_the_written_bytes(tmp_path):
    """The record names its digest and holds XXH3-128 of the header and of each tensor's
    bytes as they lie in the shard (both write paths: whole tensors and row chunks)."""
    from splice.io.shard_record import digest, input_digest

    assert digest(b"") == "99aa06d3014798d86001c324468d497f"  # XXH3-128 of no bytes
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    want = xxhash.xxh3_128(b"torch.float32[2, 3]" + x.numpy().tobytes()).hexdigest()
    assert input_digest(x) == want
    tensors, shards, out = _resume_setup(tmp_path)
    w = ShardedWriter(out, shards, {}, fingerprint="f")
    w.write("t0", tensors["t0"])
    rows = w.write_rows("t1")
    rows.write(tensors["t1"][:3])
    rows.write(tensors["t1"][3:])
    rows.close()
    w.abort()
    tmp = partial_dir_of(out)
    shard = tmp / shards[0].filename
    record = json.loads((tmp / ".splice-state" / f"{shards[0].filename}.json").read_text())
    assert record["hash"] == "xxh3-128"
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    assert record["header"] == xxhash.xxh3_128(raw[: 8 + n]).hexdigest()
    for name in ("t0", "t1"):
        begin, end = header[name]["data_offsets"]
        data = raw[8 + n + begin : 8 + n + end]
        assert record["tensors"][name] == xxhash.xxh3_128(data).hexdigest()


def test_large_tensors_round_trip_through_the_direct_writes(tmp_path, monkeypatch):
    """Tensors of several hundred KiB at unaligned offsets, whole and in row chunks, from
    threads: the O_DIRECT path (`splice.io.direct_write`) writes their whole pages and the
    shard reads back bit for bit."""
    from splice.io import direct_write

    direct_bytes = []
    real = direct_write.DirectFile._write_pages

    def counted(self, pages, offset):
        done = real(self, pages, offset)
        direct_bytes.append(done)
        return done

    monkeypatch.setattr(direct_write.DirectFile, "_write_pages", counted)
    tensors = {
        "a": sample((301, 517), torch.float32, seed=1),  # 622 KB
        "b": sample((3,), torch.bfloat16, seed=2),  # shifts what follows off the page grid
        "c": sample((1023, 333), torch.bfloat16, seed=3),
        "d": sample((77, 4099), torch.float16, seed=4),
    }
    out = tmp_path / "out"
    w = ShardedWriter(out, plan_shards(_infos(tensors), 10**9), {"format": "pt"})
    _write_all(w, {k: v for k, v in tensors.items() if k != "d"}, threads=3)
    rows = w.write_rows("d")
    for start in range(0, 77, 40):  # chunks of 328 and 303 KB
        rows.write(tensors["d"][start : start + 40])
    rows.close()
    w.finalize()
    loaded = load_file(out / "model.safetensors")
    assert all(bit_equal(loaded[k], t) for k, t in tensors.items())
    large = sum(tensors[k].numel() * tensors[k].element_size() for k in "acd")
    direct = sum(direct_bytes)
    if DirectFileProbe(tmp_path).direct:  # all but the partial end pages of 4 writes
        assert large - 5 * 2 * 4096 < direct <= large, (large, direct_bytes)


class DirectFileProbe:
    """Whether this file system takes O_DIRECT writes (else the writer falls back)."""

    def __init__(self, folder: Path) -> None:
        from splice.io.direct_write import ALIGN, DirectFile

        path = folder / "probe.bin"
        path.write_bytes(bytes(64 * ALIGN))
        f = DirectFile(path)
        f.pwrite(memoryview(bytes(64 * ALIGN)), 0)
        self.direct = f.is_direct
        f.close()
