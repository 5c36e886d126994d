"""Row chunks of SLERP, Model Stock and DARE's L1 rescale (`splice.engine.chunks`): the
whole tensor's statistics from a pre-pass over the chunks (float64, per-row partials added
in row order: `splice.merge.methods._row_gram`; SLERP's and Model Stock's Gram matrix,
`TensorGram`; DARE's L1 norms before and after its drop, `RowPartials`), then each chunk
merged elementwise; the files are the unchunked merge's bit for bit. Model Stock's
``scope: row`` is row-local (no pre-pass); the mergekit dialect's SLERP, Model Stock and
L1 rescale are not chunked."""

from __future__ import annotations

import pytest
import torch
from test_row_chunks import (
    _dare_recipe,
    _merge_rows,
    _models,
    _same_files,
    _spy_tensor_answers,
    _wide_models,
)

from splice.engine import execute as execute_mod
from splice.engine import plan_merge
from splice.engine.chunks import chunkable, tensor_pass_cost
from splice.merge import TensorGram
from splice.recipe.schema import parse_recipe

# 97 x 41 embedding and lm_head: chunks of a few rows (the last one shorter)
_BUDGET = 24_000
_BIG = ("model.embed_tokens.weight", "lm_head.weight")


def _recipe(paths: dict[str, str], method: str, dialect: str, cd: str, **params) -> dict:
    key = "merge_method" if dialect == "mergekit" else "method"
    if method == "slerp":
        models = [{"model": paths["ft0"]}]
        if dialect == "mergekit":  # mergekit's slerp names the base among its two models
            models = [{"model": paths["base"]}, {"model": paths["ft0"]}]
        params = {"t": 0.3, **params}
    else:
        models = [{"model": paths[f"ft{i}"]} for i in range(3)]
    doc = {key: method, "base_model": paths["base"], "models": models, "dtype": cd}
    return {**doc, "parameters": params} if params else doc


def _whole_then_chunked(recipe: dict, tmp_path, monkeypatch) -> tuple[dict, list]:
    """``recipe`` merged whole (into tmp_path/whole: no chunks) and at ``_BUDGET`` (into
    tmp_path/chunked: the embedding and lm_head in more than 4 chunks of < 97 rows); the
    chunk rows per chunked tensor and the per-tensor answers the chunks got."""
    whole = _merge_rows(recipe, tmp_path / "whole", monkeypatch)
    answers = _spy_tensor_answers(monkeypatch)
    kw = {"threads": 1, "memory_budget": _BUDGET}
    chunked = _merge_rows(recipe, tmp_path / "chunked", monkeypatch, **kw)
    assert whole == {}
    for name in _BIG:
        assert len(chunked[name]) > 4 and max(chunked[name]) < 97, chunked[name]
    return chunked, answers


def _gram_answers(answers: list) -> list[torch.Tensor]:
    return [a for a in answers if isinstance(a, torch.Tensor)]


@pytest.mark.parametrize("cd", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("method", "params", "pre_pass"),
    [
        ("slerp", {}, True),
        ("model_stock", {}, True),
        ("model_stock", {"scope": "row"}, False),
    ],
)
def test_chunked_slerp_and_model_stock_equal_unchunked_bit_for_bit(
    tmp_path, monkeypatch, cd, dtype, method, params, pre_pass
):
    """Chunked merges give the unchunked files; scope tensor answers one Gram per chunk (the
    same for all chunks of a tensor: m × m, float64), scope row none."""
    recipe = _recipe(_wide_models(tmp_path, dtype), method, "splice", cd, **params)
    chunked, answers = _whole_then_chunked(recipe, tmp_path, monkeypatch)
    grams = _gram_answers(answers)
    if pre_pass:
        m = 2 if method == "slerp" else 3
        assert grams and all(g.shape == (m, m) and g.dtype == torch.float64 for g in grams)
        # one Gram per chunk, equal within a tensor: as many distinct ones as tensors
        distinct = {tuple(g.flatten().tolist()) for g in grams}
        assert len(distinct) == len(chunked)
    else:
        assert grams == []
    _same_files(tmp_path / "whole", tmp_path / "chunked")


def test_each_chunk_merged_with_its_own_gram_differs(tmp_path, monkeypatch):
    """The pre-pass is what makes the chunks agree: answering each chunk with nothing (so
    SLERP takes the chunk's own norms and dot) gives other files."""
    recipe = _recipe(_wide_models(tmp_path, torch.float32), "slerp", "splice", "float32")
    _merge_rows(recipe, tmp_path / "whole", monkeypatch)
    monkeypatch.setattr(
        execute_mod,
        "chunk_tensor_rules",
        lambda sources, plan, index, rows_per: [{} for _ in range(-(-97 // rows_per))],
    )
    kw = {"threads": 1, "memory_budget": _BUDGET}
    _merge_rows(recipe, tmp_path / "own", monkeypatch, **kw)
    shards = sorted(p.name for p in (tmp_path / "whole").glob("*.safetensors"))
    assert any(
        (tmp_path / "whole" / f).read_bytes() != (tmp_path / "own" / f).read_bytes() for f in shards
    )


@pytest.mark.parametrize(
    ("method", "params"),
    [("slerp", {}), ("model_stock", {}), ("model_stock", {"filter_wise": True})],
)
def test_the_mergekit_dialect_is_not_chunked(tmp_path, monkeypatch, method, params):
    """mergekit's reductions (thread ranges, 2^20-entry SLERP chunks) span the whole tensor:
    its SLERP and Model Stock stay unchunked, whatever the budget."""
    recipe = _recipe(_wide_models(tmp_path, torch.float32), method, "mergekit", "float32", **params)
    kw = {"threads": 1, "memory_budget": _BUDGET}
    assert _merge_rows(recipe, tmp_path / "out", monkeypatch, **kw) == {}


def test_which_jobs_are_chunkable_and_what_the_pre_pass_costs(tmp_path):
    """16 x 8 lm_head (128 entries), 1-D norm weight. SLERP and Model Stock scope tensor:
    chunkable in the splice dialect, with the pre-pass's float64 scratch held: (m + 1)
    blocks of 8 bytes an entry, a block at most a chunk (``rows_per`` rows) or the tensor.
    Scope row: a 2-D tensor's row chunk holds whole rows (no pre-pass, no cost); a 1-D
    tensor is one row, not chunked. The mergekit dialect: nothing."""
    paths = _models(tmp_path, torch.float32)
    cases = [
        # (method, dialect, params, lm_head chunkable, norm chunkable, cost, cost of 2 rows)
        ("slerp", "splice", {}, True, True, (0, 8 * 3 * 128), (0, 8 * 3 * 16)),
        ("model_stock", "splice", {}, True, True, (0, 8 * 4 * 128), (0, 8 * 4 * 16)),
        ("model_stock", "splice", {"scope": "row"}, True, False, (0, 0), (0, 0)),
        ("slerp", "mergekit", {}, False, False, None, None),
        ("model_stock", "mergekit", {}, False, False, None, None),
        ("model_stock", "mergekit", {"filter_wise": True}, False, False, None, None),
    ]
    for method, dialect, params, head, norm, cost, cost2 in cases:
        plan = plan_merge(parse_recipe(_recipe(paths, method, dialect, "float32", **params)))
        try:
            by_name = {j.out.name: i for i, j in enumerate(plan.jobs)}
            lm_head, norm_w = by_name["lm_head.weight"], by_name["model.norm.weight"]
            assert chunkable(plan, lm_head) is head, (method, dialect, params)
            assert chunkable(plan, norm_w) is norm, (method, dialect, params)
            if cost is not None:
                assert tensor_pass_cost(plan, lm_head) == cost
                assert tensor_pass_cost(plan, lm_head, rows_per=2) == cost2
        finally:
            plan.close()


def test_a_gram_request_is_a_statistic_key():
    assert TensorGram(of_delta=True) == TensorGram(of_delta=True)
    assert len({TensorGram(of_delta=True), TensorGram(of_delta=False)}) == 2


@pytest.mark.parametrize("cd", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
def test_chunked_dare_with_the_l1_rescale_equals_unchunked_bit_for_bit(
    tmp_path, monkeypatch, cd, dtype, method
):
    """Splice dialect, ``rescale: l1``: each chunk's drop is the tensor's stream from its
    first entry, and its rescale |δ|_1 / |m ⊙ δ|_1 the whole tensor's (a pre-pass drawing
    the same drops, `dare_l1_partials`): the unchunked files. Each answer: the 3 models'
    two norms, one per chunk and equal within a tensor."""
    recipe = _dare_recipe(_wide_models(tmp_path, dtype), method, "splice", "l1", cd)
    chunked, answers = _whole_then_chunked(recipe, tmp_path, monkeypatch)
    totals = _gram_answers(answers)
    assert totals and all(t.shape == (6,) and t.dtype == torch.float64 for t in totals)
    assert len({tuple(t.tolist()) for t in totals}) == len(chunked)
    _same_files(tmp_path / "whole", tmp_path / "chunked")


def test_the_l1_pre_pass_cost(tmp_path):
    """DARE's L1 pre-pass holds one float64 block of row sums beside a chunk's step: 8
    bytes an entry of min(chunk, ``ROW_BLOCK``); none without the L1 rescale."""
    paths = _models(tmp_path, torch.float32)
    for rescale, cost, cost2 in (("l1", (0, 8 * 128), (0, 8 * 16)), ("inverse", (0, 0), (0, 0))):
        recipe = _dare_recipe(paths, "dare_ties", "splice", rescale, "float32")
        plan = plan_merge(parse_recipe(recipe))
        try:
            lm_head = next(i for i, j in enumerate(plan.jobs) if j.out.name == "lm_head.weight")
            assert chunkable(plan, lm_head)
            assert tensor_pass_cost(plan, lm_head) == cost
            assert tensor_pass_cost(plan, lm_head, rows_per=2) == cost2
        finally:
            plan.close()
