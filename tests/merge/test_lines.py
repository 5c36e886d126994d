"""LiNeS: the layer scaling rule by hand, and through the engine (layer context from names)."""

import json

import pytest
import torch
from merge_test_util import run
from safetensors.torch import save_file

from splice.engine import plan_merge, run_merge
from splice.merge import DepthScale, MergeContext
from splice.recipe.schema import parse_recipe
from splice.reference import open_checkpoint


def test_scale_rule():
    # α + β·l/(L−1): L = 5, l = 2 -> 0.2 + 0.8·2/4 = 0.6; last layer α + β; outside layers α
    s = DepthScale(0.2, 0.8)
    assert s.at(2, 5) == pytest.approx(0.6)
    assert s.at(4, 5) == 1.0
    assert s.at(None, 5) == 0.2
    assert s.at(0, 1) == 0.2
    # the request is answered from the context's layer fields
    assert MergeContext(layer_index=2, num_layers=5).stat(s) == pytest.approx(0.6)


def test_task_arithmetic_scaled_by_depth():
    # δ = (1, 2) and (3, 0) with weights 1, ½: Σ w δ = (2.5, 2); layer 2 of 5: s = 0.6
    ctx = MergeContext(tensor_name="model.layers.2.mlp.weight", layer_index=2, num_layers=5)
    out = run(
        "lines",
        [1.0, 1.0],
        [[2.0, 3.0], [4.0, 1.0]],
        ctx=ctx,
        alpha=0.2,
        beta=0.8,
        weight=[1.0, 0.5],
    )
    torch.testing.assert_close(out, torch.tensor([1 + 1.5, 1 + 1.2]))
    outside = run(
        "lines", [1.0, 1.0], [[2.0, 3.0], [4.0, 1.0]], alpha=0.2, beta=0.8, weight=[1.0, 0.5]
    )
    torch.testing.assert_close(outside, torch.tensor([1 + 0.5, 1 + 0.4]))


def _folder(path, value):
    path.mkdir()
    names = [f"model.layers.{i}.mlp.weight" for i in range(3)] + ["model.norm.weight"]
    save_file({n: torch.full((2, 2), value) for n in names}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"num_hidden_layers": 3}))
    return str(path)


def test_engine_fills_the_layer_context(tmp_path):
    base, ft = _folder(tmp_path / "base", 0.0), _folder(tmp_path / "ft", 1.0)
    recipe = {
        "method": "lines",
        "base_model": base,
        "models": [{"model": ft}],
        "parameters": {"alpha": 0.5, "beta": 1.0},
    }
    plan = plan_merge(parse_recipe(recipe))
    try:
        run_merge(plan, tmp_path / "out", progress=False)
    finally:
        plan.close()
    r = open_checkpoint(str(tmp_path / "out"))
    # L = 3: layers 0, 1, 2 get 0.5 + 1.0·(0, ½, 1); the final norm (no layer) gets α = 0.5
    got = {n: float(r.read(n)[0, 0]) for n in r.names()}
    r.close()
    assert got == {
        "model.layers.0.mlp.weight": 0.5,
        "model.layers.1.mlp.weight": 1.0,
        "model.layers.2.mlp.weight": 1.5,
        "model.norm.weight": 0.5,
    }


def _merge(tmp_path, recipe, name):
    plan = plan_merge(parse_recipe(recipe))
    try:
        run_merge(plan, tmp_path / name, progress=False)
    finally:
        plan.close()
    r = open_checkpoint(str(tmp_path / name))
    got = {n: r.read(n) for n in r.names()}
    r.close()
    return got


def test_post_step_scales_any_methods_task_vector(tmp_path):
    base, a, b = (_folder(tmp_path / n, v) for n, v in (("base", 0.0), ("a", 1.0), ("b", 3.0)))
    models = [{"model": a}, {"model": b}]
    # TIES (density 1, disjoint mean of agreeing signs): merged δ = (1 + 3) / 2 = 2 everywhere;
    # the post-step scales it by 0.5 + 1.0·l/2 -> layers 1, 2, 3 ... and the norm 1.0
    got = _merge(
        tmp_path,
        {
            "method": "ties",
            "base_model": base,
            "models": models,
            "lines": {"alpha": 0.5, "beta": 1.0},
        },
        "ties",
    )
    want = {
        "model.layers.0.mlp.weight": 1.0,
        "model.layers.1.mlp.weight": 2.0,
        "model.layers.2.mlp.weight": 3.0,
        "model.norm.weight": 1.0,
    }
    assert {n: float(t[0, 0]) for n, t in got.items()} == want
    # task arithmetic + the post-step is the `lines` method itself
    post = _merge(
        tmp_path,
        {
            "method": "task_arithmetic",
            "base_model": base,
            "models": models,
            "lines": {"alpha": 0.25, "beta": 0.5},
        },
        "ta",
    )
    own = _merge(
        tmp_path,
        {
            "method": "lines",
            "base_model": base,
            "models": models,
            "parameters": {"alpha": 0.25, "beta": 0.5},
        },
        "lines",
    )
    for n in own:
        torch.testing.assert_close(post[n], own[n], rtol=0, atol=0)


def test_post_step_needs_a_base_using_method(tmp_path):
    from splice.errors import MergeValidationError, RecipeError

    base, a = _folder(tmp_path / "base", 0.0), _folder(tmp_path / "a", 1.0)
    recipe = {"method": "linear", "models": [{"model": base}, {"model": a}]}
    with pytest.raises(MergeValidationError, match="takes no base_model"):
        plan_merge(parse_recipe({**recipe, "lines": {"alpha": 0.5, "beta": 0.5}}))
    with pytest.raises(RecipeError, match="gamma"):
        parse_recipe({**recipe, "lines": {"alpha": 0.5, "beta": 0.5, "gamma": 1}})
