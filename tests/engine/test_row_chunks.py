"""Row chunks (`splice.engine.chunks`): a job over its budget share merged a slice of rows at
a time gives the unchunked files bit for bit (tensors, shard records, resume), and only the
elementwise methods, magnitude trims (TIES, magnitude_prune), DARE's seeded drop (each
chunk's mask the tensor's stream from its first flat entry) and copies are chunked (and,
with a statistics pre-pass, the splice dialect's SLERP, Model Stock and DARE L1 rescale:
`test_row_chunks_prepass.py`)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import CONFIG, tiny_tensors, write_folder

from splice.engine import chunks as chunks_mod
from splice.engine import execute as execute_mod
from splice.engine import plan_merge, run_merge
from splice.engine.chunks import chunkable, rows_per_chunk, tensor_pass_cost
from splice.io.writer import ShardedWriter
from splice.merge import KeepMask, KeepRule
from splice.recipe.schema import parse_recipe


def _models(tmp_path, dtype: torch.dtype) -> dict[str, str]:
    base = tiny_tensors(0)
    base["model.position_ids"] = torch.arange(20)  # an integer buffer: a copy job
    paths = {"base": write_folder(tmp_path / "base", {n: _cast(t, dtype) for n, t in base.items()})}
    for i in range(3):
        d = tiny_tensors(100 + i, scale=0.1)
        ft = {n: _cast(t + d[n], dtype) if n in d else t for n, t in base.items()}
        paths[f"ft{i}"] = write_folder(tmp_path / f"ft{i}", ft, shard_bytes=600)
    return paths


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() else t


def _recipes(paths: dict[str, str]) -> dict[str, dict]:
    models = [
        {"model": paths[f"ft{i}"], "parameters": {"weight": w}}
        for i, w in enumerate((0.7, 0.8, 0.6))
    ]
    return {
        "task_arithmetic+lines": {
            "method": "task_arithmetic",
            "base_model": paths["base"],
            "models": models,
            "parameters": {"lambda": 0.9},
            "lines": {"alpha": 0.5, "beta": 0.5},
        },
        "mergekit task_arithmetic bf16": {
            "merge_method": "task_arithmetic",
            "base_model": paths["base"],
            "models": models,
            "dtype": "bfloat16",
        },
        "mergekit linear fp16 out": {
            "merge_method": "linear",
            "models": models,
            "dtype": "float32",
            "out_dtype": "float16",
        },
    }


def _merge(recipe: dict, out, monkeypatch, **kw) -> list[int]:
    """Run the merge; the row counts of every chunked write, in order."""
    return [n for rows in _merge_rows(recipe, out, monkeypatch, **kw).values() for n in rows]


def _merge_rows(recipe: dict, out, monkeypatch, **kw) -> dict[str, list[int]]:
    """Run the merge; the row counts of the chunked writes of each tensor, in order."""
    chunked: dict[str, list[int]] = {}
    real = ShardedWriter.write_rows

    def spy(self, name, **k):
        rows = real(self, name, **k)
        write = rows.write
        rows.write = lambda c: (chunked.setdefault(name, []).append(c.shape[0]), write(c))[1]
        return rows

    monkeypatch.setattr(ShardedWriter, "write_rows", spy)
    plan = plan_merge(parse_recipe(recipe))
    try:
        run_merge(plan, out, progress=False, shard_bytes=700, **kw)
    finally:
        plan.close()
        monkeypatch.undo()
    return chunked


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "which", ["task_arithmetic+lines", "mergekit task_arithmetic bf16", "mergekit linear fp16 out"]
)
def test_chunked_merges_equal_unchunked_bit_for_bit(tmp_path, monkeypatch, dtype, which):
    recipe = _recipes(_models(tmp_path, dtype))[which]
    whole = _merge(recipe, tmp_path / "whole", monkeypatch)
    # 3 jobs at once (1 worker + 2 ahead): a 2 kB budget gives shares of ~680 bytes, below
    # the 16 x 8 embedding and lm_head jobs and the copied position ids
    chunked = _merge(recipe, tmp_path / "chunked", monkeypatch, threads=1, memory_budget=2048)
    assert whole == [] and len(chunked) > 6 and max(chunked) < 16
    files = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "chunked").iterdir())
    for name in files:
        assert (tmp_path / "whole" / name).read_bytes() == (
            tmp_path / "chunked" / name
        ).read_bytes()


def test_a_chunked_run_resumes_unchunked_to_the_same_files(tmp_path, monkeypatch):
    """The shard records of chunked tensors (output and input digests hashed chunk by chunk)
    are what an unchunked run re-checks on --resume: the finished shards are kept."""
    recipe = _recipes(_models(tmp_path, torch.float32))["task_arithmetic+lines"]
    _merge(recipe, tmp_path / "ref", monkeypatch)
    real = execute_mod._Runner.__call__
    calls = {"n": 0}

    def crashing(self, index):
        calls["n"] += 1
        if calls["n"] > 8:
            raise KeyboardInterrupt  # Ctrl-C midway
        return real(self, index)

    monkeypatch.setattr(execute_mod._Runner, "__call__", crashing)
    with pytest.raises(KeyboardInterrupt):
        _merge(recipe, tmp_path / "out", monkeypatch, threads=1, memory_budget=2048)
    kept = [p.name for p in (tmp_path / "out.splice-partial").glob("*.safetensors")]
    assert kept  # the first shard holds the chunked embedding
    plan = plan_merge(parse_recipe(recipe))
    try:
        report = run_merge(plan, tmp_path / "out", progress=False, shard_bytes=700, resume=True)
    finally:
        plan.close()
    assert report.skipped > 0
    for f in sorted((tmp_path / "ref").glob("*.safetensors")):
        assert (tmp_path / "out" / f.name).read_bytes() == f.read_bytes()


def test_only_elementwise_methods_trims_and_copies_are_chunked(tmp_path):
    paths = _models(tmp_path, torch.float32)
    models = [
        {"model": paths[f"ft{i}"], "parameters": {"weight": 1.0, "density": 0.5}} for i in range(3)
    ]
    cases = {
        ("ties", False): True,
        ("ties", True): False,  # the L1 rescale needs the whole tensor's norms
        ("magnitude_prune", False): True,
        ("dare_ties", False): True,  # each chunk's mask: the stream from its first entry
        ("dare_ties", True): False,  # the L1 rescale needs the whole tensor's norms
        ("della", False): True,  # ranks within rows; each chunk's mask: the stream from there
        ("della", True): False,  # the L1 rescale needs the whole tensor's norms
        ("slerp", False): False,
        ("task_arithmetic", False): True,
    }
    for (method, rescale), elementwise in cases.items():
        doc = {"merge_method": method, "base_model": paths["base"], "models": models}
        if method == "slerp":
            doc = {**doc, "models": [{"model": paths["ft0"]}, {"model": paths["base"]}]}
            doc["parameters"] = {"t": 0.5}
        elif method == "della":
            doc["parameters"] = {"rescale": rescale, "epsilon": 0.1}
        elif method != "task_arithmetic":
            doc["parameters"] = {"rescale": rescale}
        plan = plan_merge(parse_recipe(doc))
        try:
            by_name = {j.out.name: i for i, j in enumerate(plan.jobs)}
            emb, ids = by_name["model.embed_tokens.weight"], by_name["model.position_ids"]
            assert chunkable(plan, emb) is elementwise
            assert chunkable(plan, ids)  # a copy
            assert not chunkable(plan, by_name["model.norm.weight"]) or elementwise
            rows = rows_per_chunk(plan, ids, cost=1000, share=250)
            assert rows == 5  # 20 rows x 250 / 1000
            assert rows_per_chunk(plan, ids, cost=1000, share=1000) is None
        finally:
            plan.close()


class _WholeTensorReader:
    """A reader that can only read whole tensors (like a pickled .bin checkpoint)."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def info(self, name):
        return self.inner.info(name)


def test_inputs_that_cannot_read_rows_alone_are_not_chunked(tmp_path):
    paths = _models(tmp_path, torch.float32)
    recipe = _recipes(paths)["task_arithmetic+lines"]
    plan = plan_merge(parse_recipe(recipe))
    try:
        emb = next(i for i, j in enumerate(plan.jobs) if j.out.name == "lm_head.weight")
        assert chunkable(plan, emb)
        ref = plan.jobs[emb].inputs[1].ref
        plan.readers[ref] = _WholeTensorReader(plan.readers[ref])  # type: ignore[assignment]
        assert not chunkable(plan, emb)  # each chunk would read the whole tensor again
    finally:
        plan.readers[ref] = plan.readers[ref].inner  # type: ignore[attr-defined]
        plan.close()


def _grid_models(tmp_path, dtype: torch.dtype) -> dict[str, str]:
    """Base on a 1/16 grid, task vectors of -3/64 .. 3/64: exact in bfloat16, and |δ| takes
    four values, so every trim threshold has many ties (the tie quota is split across
    chunks; the mergekit dialect's sort order decides which ties survive)."""
    g = torch.Generator().manual_seed(7)
    names = tiny_tensors(0)
    base = {n: torch.randint(-16, 17, t.shape, generator=g) / 16 for n, t in names.items()}
    base["model.position_ids"] = torch.arange(20)
    paths = {"base": write_folder(tmp_path / "base", {n: _cast(t, dtype) for n, t in base.items()})}
    for i in range(3):
        ft = {
            n: _cast(t + torch.randint(-3, 4, t.shape, generator=g) / 64, dtype)
            if t.is_floating_point()
            else t
            for n, t in base.items()
        }
        paths[f"ft{i}"] = write_folder(tmp_path / f"ft{i}", ft, shard_bytes=600)
    return paths


def _trim_recipe(paths: dict[str, str], method: str, dialect: str, scope: str, cd: str) -> dict:
    models = [
        {"model": paths[f"ft{i}"], "parameters": {"weight": w, "density": d}}
        for i, (w, d) in enumerate(((1.0, 0.2), (0.8, 0.3), (0.6, 0.5)))
    ]
    key = "merge_method" if dialect == "mergekit" else "method"
    return {
        key: method,
        "base_model": paths["base"],
        "models": models,
        "parameters": {"scope": scope, "lambda": 0.9},
        "dtype": cd,
    }


def _same_files(a, b) -> None:
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("cd", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize(
    ("method", "dialect", "scope"),
    [
        ("ties", "splice", "model"),
        ("ties", "splice", "tensor"),
        ("magnitude_prune", "splice", "model"),
        ("magnitude_prune", "splice", "tensor"),
        ("ties", "mergekit", "model"),
        ("ties", "mergekit", "tensor"),
        ("magnitude_prune", "mergekit", "tensor"),
    ],
)
@pytest.mark.parametrize("grid", [False, True], ids=["random", "tied"])
def test_chunked_trims_equal_unchunked_bit_for_bit(
    tmp_path, monkeypatch, cd, method, dialect, scope, grid
):
    """TIES / magnitude_prune in row chunks: the same files as the unchunked merge, with the
    tie quota carried from chunk to chunk (scope model: the whole-model rule's; scope tensor:
    the pre-pass's), or, for the mergekit dialect's per-tensor trim of bf16 task vectors
    (ties at the threshold in torch's sort order over the whole tensor), each chunk's rows
    of the whole tensor's keep mask."""
    paths = (_grid_models if grid else _models)(tmp_path, torch.bfloat16)
    recipe = _trim_recipe(paths, method, dialect, scope, cd)
    whole = _merge_rows(recipe, tmp_path / "whole", monkeypatch)
    answers = _spy_tensor_answers(monkeypatch)
    chunked = _merge_rows(recipe, tmp_path / "chunked", monkeypatch, threads=1, memory_budget=2048)
    assert whole == {}
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert len(chunked[name]) > 2 and max(chunked[name]) < 16
    # 16-bit inputs: every mergekit per-tensor trim is selected over the whole tensor
    if scope == "tensor":
        kinds = {KeepMask} if dialect == "mergekit" else {KeepRule}
        assert {type(a) for a in answers} == kinds
    _same_files(tmp_path / "whole", tmp_path / "chunked")


def _spy_tensor_answers(monkeypatch) -> list:
    """Collects every per-chunk answer `chunk_tensor_rules` gives."""
    found: list = []
    real = execute_mod.chunk_tensor_rules

    def spy(*args, **kw):
        out = real(*args, **kw)
        found.extend(a for chunk in out for a in chunk.values())
        return out

    monkeypatch.setattr(execute_mod, "chunk_tensor_rules", spy)
    return found


@pytest.mark.parametrize("method", ["ties", "magnitude_prune"])
@pytest.mark.parametrize("grid", [False, True], ids=["random", "tied"])
def test_a_float32_mergekit_trim_needs_masks_only_when_ties_are_left_out(
    tmp_path, monkeypatch, grid, method
):
    """float32 models: the radix pre-pass decides. Random task vectors (no two |δ| equal):
    the per-tensor top-k set is unique, so the chunk rules give torch's selection; task
    vectors on a grid leave ties out at the threshold: each chunk gets its rows of the keep
    mask selected over the whole tensor. Both are chunked and give the unchunked files."""
    paths = (_grid_models if grid else _models)(tmp_path, torch.float32)
    recipe = _trim_recipe(paths, method, "mergekit", "tensor", "float32")
    whole = _merge_rows(recipe, tmp_path / "whole", monkeypatch)
    answers = _spy_tensor_answers(monkeypatch)
    chunked = _merge_rows(recipe, tmp_path / "chunked", monkeypatch, threads=1, memory_budget=2048)
    assert whole == {}
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert len(chunked[name]) > 2 and max(chunked[name]) < 16
    kinds = {type(a) for a in answers}
    assert kinds == ({KeepRule, KeepMask} if grid else {KeepRule})
    _same_files(tmp_path / "whole", tmp_path / "chunked")


def test_a_keep_mask_packs_eight_entries_a_byte():
    mask = torch.tensor(
        [[1, 0, 0, 0, 0, 0, 0, 1, 1], [0, 1, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool
    )
    packed = KeepMask.pack(mask)
    assert packed.bits.tolist() == [0b10000001, 0b10100000, 0b00000000]
    assert packed.nbytes == 3 and packed.count == 18
    assert torch.equal(packed.unpack((2, 9)), mask)


@pytest.mark.parametrize("pairs", [True, False], ids=["pairs", "whole-delta"])
@pytest.mark.parametrize(("cd", "peak"), [("bfloat16", 11), ("float16", 15), ("float32", 13)])
def test_the_whole_tensor_selection_is_in_the_job_cost(tmp_path, monkeypatch, cd, peak, pairs):
    """mergekit dialect, scope tensor, 16 x 8 = 128 entries, the packed masks of the three
    trimmed models held (16 bytes each). With the compiled pairs selection: its 8-byte
    (|δ|, index) pairs and the packed mask, whatever the dtype (8 x 128 + 16); without it:
    one model's δ (s bytes an entry) plus the selection's scratch (9 bytes an entry; 13 for
    float16's float32 magnitudes)."""
    if pairs and not chunks_mod.pairs_selectable(128):
        pytest.skip("the compiled selection is not built")
    if not pairs:
        monkeypatch.setattr(chunks_mod, "pairs_selectable", lambda n: False)
    paths = _models(tmp_path, torch.bfloat16)
    first = 8 * 128 + 16 if pairs else peak * 128
    for dialect, want in (("mergekit", (first, 3 * 16)), ("splice", (0, 0))):
        plan = plan_merge(parse_recipe(_trim_recipe(paths, "ties", dialect, "tensor", cd)))
        try:
            emb = next(i for i, j in enumerate(plan.jobs) if j.out.name == "lm_head.weight")
            assert tensor_pass_cost(plan, emb) == want
        finally:
            plan.close()


@pytest.mark.parametrize("cd", ["bfloat16", "float16"])
def test_keep_masks_from_pairs_and_from_the_whole_delta_agree(tmp_path, monkeypatch, cd):
    """The mergekit dialect's chunked per-tensor trim of bf16 task vectors on a grid (ties
    at every threshold): the compiled pairs selection (filled a chunk at a time) and the
    whole-δ trim it replaces give the same files as the unchunked merge."""
    paths = _grid_models(tmp_path, torch.bfloat16)
    recipe = _trim_recipe(paths, "ties", "mergekit", "tensor", cd)
    whole = _merge_rows(recipe, tmp_path / "whole", monkeypatch)
    assert whole == {}
    used: list[int] = []
    real = chunks_mod.select_pairs_packed

    def spy(pairs, k):
        used.append(k)
        return real(pairs, k)

    monkeypatch.setattr(chunks_mod, "select_pairs_packed", spy)
    _merge_rows(recipe, tmp_path / "pairs", monkeypatch, threads=1, memory_budget=2048)
    assert bool(used) == chunks_mod.pairs_selectable(128)  # every chunked tensor x 3 models
    monkeypatch.setattr(chunks_mod, "pairs_selectable", lambda n: False)
    used.clear()
    _merge_rows(recipe, tmp_path / "delta", monkeypatch, threads=1, memory_budget=2048)
    assert used == []
    _same_files(tmp_path / "whole", tmp_path / "pairs")
    _same_files(tmp_path / "whole", tmp_path / "delta")


def _wide_models(tmp_path, dtype: torch.dtype) -> dict[str, str]:
    """A 97 x 41 embedding and lm_head (3977 entries): row chunks start at flat entries
    that are multiples of 41, not of the generator's 312-entry blocks, and cross them."""
    g = torch.Generator().manual_seed(11)
    shapes = {"model.embed_tokens.weight": (97, 41), "model.norm.weight": (41,)}
    shapes["lm_head.weight"] = (97, 41)
    base = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    config = {**CONFIG, "hidden_size": 41, "vocab_size": 97}
    folder = {n: _cast(t, dtype) for n, t in base.items()}
    paths = {"base": write_folder(tmp_path / "base", folder, config=config)}
    for i in range(3):
        ft = {n: _cast(t + 0.1 * torch.randn(t.shape, generator=g), dtype) for n, t in base.items()}
        paths[f"ft{i}"] = write_folder(tmp_path / f"ft{i}", ft, shard_bytes=9000, config=config)
    return paths


def _dare_recipe(paths: dict[str, str], method: str, dialect: str, rescale, cd: str) -> dict:
    models = [
        {"model": paths[f"ft{i}"], "parameters": {"weight": w, "density": d}}
        for i, (w, d) in enumerate(((1.0, 0.2), (0.8, 0.3), (0.6, 0.5)))
    ]
    key = "merge_method" if dialect == "mergekit" else "method"
    doc = {key: method, "base_model": paths["base"], "models": models, "dtype": cd}
    doc["parameters"] = {"rescale": rescale, "lambda": 0.9}
    return doc if dialect == "mergekit" else {**doc, "seed": 5}


# chunks of 2 to 4 rows (float32 compute: 3 rows, 123 entries, 33 chunks, the last 1 row; a
# chunk's merge and the next chunk's inputs read ahead fit the share), most starting inside
# a 312-entry block
_DARE_BUDGET = 24_000


def _chunked_random_drop_is_whole(recipe: dict, tmp_path, monkeypatch) -> None:
    """A random-drop recipe merged whole and in chunks of 2 to 4 rows: the same files; with
    every chunk drawn from the start of its stream (offset 0), other files."""
    whole = _merge_rows(recipe, tmp_path / "whole", monkeypatch)
    kw = {"threads": 1, "memory_budget": _DARE_BUDGET}
    chunked = _merge_rows(recipe, tmp_path / "chunked", monkeypatch, **kw)
    assert whole == {}
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert len(chunked[name]) > 8 and max(chunked[name]) < 12, chunked[name]
    _same_files(tmp_path / "whole", tmp_path / "chunked")
    real = execute_mod._Runner._merge
    monkeypatch.setattr(
        execute_mod._Runner,
        "_merge",
        lambda self, index, read, stats=None, offset=0: real(self, index, read, stats, 0),
    )
    _merge_rows(recipe, tmp_path / "offset0", monkeypatch, **kw)
    shards = sorted(p.name for p in (tmp_path / "whole").glob("*.safetensors"))
    assert any(
        (tmp_path / "whole" / f).read_bytes() != (tmp_path / "offset0" / f).read_bytes()
        for f in shards
    )


@pytest.mark.parametrize("cd", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("method", "dialect", "rescale"),
    [
        ("dare_ties", "splice", "inverse"),
        ("dare_ties", "splice", "none"),
        ("dare_linear", "splice", "inverse"),
        ("dare_ties", "mergekit", False),
        ("dare_linear", "mergekit", False),
    ],
)
def test_chunked_dare_equals_unchunked_bit_for_bit(
    tmp_path, monkeypatch, cd, dtype, method, dialect, rescale
):
    """DARE / DARE-TIES in row chunks: each chunk's masks are the tensor's streams from its
    first flat entry, so the files are the unchunked ones (float32 / bfloat16: the compiled
    drop; float16: torch's draws, the entries before the chunk drawn and discarded); every
    chunk drawn from the start of the stream (offset 0) gives other files."""
    recipe = _dare_recipe(_wide_models(tmp_path, dtype), method, dialect, rescale, cd)
    _chunked_random_drop_is_whole(recipe, tmp_path, monkeypatch)


@pytest.mark.parametrize("cd", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    ("method", "dialect", "rescale"),
    [
        ("della", "splice", "inverse"),
        ("della", "splice", "none"),
        ("della_linear", "splice", "inverse"),
        ("della", "mergekit", False),
    ],
)
def test_chunked_della_equals_unchunked_bit_for_bit(
    tmp_path, monkeypatch, cd, method, dialect, rescale
):
    """DELLA in row chunks: each chunk ranks its own whole rows and draws the tensor's
    stream from its first flat entry, so the files are the unchunked ones; every chunk drawn
    from the start of the stream gives other files."""
    recipe = _dare_recipe(_wide_models(tmp_path, torch.float32), method, dialect, rescale, cd)
    _chunked_random_drop_is_whole(recipe, tmp_path, monkeypatch)


@pytest.mark.parametrize(("dialect", "rescale"), [("mergekit", True)])
def test_dare_with_the_mergekit_l1_rescale_is_not_chunked(tmp_path, monkeypatch, dialect, rescale):
    recipe = _dare_recipe(
        _wide_models(tmp_path, torch.float32), "dare_ties", dialect, rescale, "float32"
    )
    kw = {"threads": 1, "memory_budget": _DARE_BUDGET}
    assert _merge_rows(recipe, tmp_path / "out", monkeypatch, **kw) == {}
