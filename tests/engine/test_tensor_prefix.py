"""`tensor_prefix` on a recipe model: the model names the base's tensor N `prefix + N` (a
classifier fine-tuned from a bare backbone). The output keeps the base's names; values by hand."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_tensors, write_folder

from splice.engine import plan_merge, run_merge
from splice.errors import SpliceError
from splice.recipe.schema import parse_recipe


@pytest.fixture
def bare(tmp_path: Path) -> dict:
    """A bare base (``model.`` stripped, no lm_head) and two 'classifiers': the base's
    tensors under ``model.`` plus small deltas, and a ``score.weight`` head each."""
    full = tiny_tensors(0)
    base = {n.removeprefix("model."): t for n, t in full.items() if n.startswith("model.")}
    out = {"base": write_folder(tmp_path / "base", base), "t": {"base": base}}
    for i in range(2):
        d = tiny_tensors(10 + i, scale=0.1)
        ft = {"model." + n: t + d["model." + n] for n, t in base.items()}
        ft["score.weight"] = torch.full((2, 8), float(i))
        out[f"ft{i}"] = write_folder(tmp_path / f"ft{i}", ft)
        out["t"][f"ft{i}"] = ft
    return out


def _recipe(bare: dict, **over) -> dict:
    models = [
        {"model": bare["ft0"], "tensor_prefix": "model.", "parameters": {"weight": 0.5}},
        {"model": bare["ft1"], "tensor_prefix": "model.", "parameters": {"weight": 0.25}},
    ]
    return {"method": "task_arithmetic", "base_model": bare["base"], "models": models, **over}


def _merge(recipe: dict, out: Path) -> dict[str, torch.Tensor]:
    plan = plan_merge(parse_recipe(recipe))
    try:
        run_merge(plan, out, progress=False)
    finally:
        plan.close()
    return load_file(str(out / "model.safetensors"))


def test_prefixed_models_merge_onto_the_bare_base_names(bare, tmp_path):
    got = _merge(_recipe(bare, on_missing="drop"), tmp_path / "out")
    base, ft0, ft1 = bare["t"]["base"], bare["t"]["ft0"], bare["t"]["ft1"]
    assert set(got) == set(base)  # the base's names; the heads are not in the base's names
    for n, b in base.items():
        by_hand = b + 0.5 * (ft0["model." + n] - b) + 0.25 * (ft1["model." + n] - b)
        torch.testing.assert_close(got[n], by_hand, rtol=0, atol=1e-6)


def test_filters_match_the_models_own_names(bare, tmp_path):
    recipe = _recipe(bare, on_missing="drop")
    recipe["models"][0]["parameters"]["weight"] = [
        {"filter": "re:^model\\.norm\\.weight$", "value": 1.0},
        {"value": 0.0},
    ]
    got = _merge(recipe, tmp_path / "out")
    base, ft0, ft1 = bare["t"]["base"], bare["t"]["ft0"], bare["t"]["ft1"]
    norm = base["norm.weight"] + (ft0["model.norm.weight"] - base["norm.weight"])
    norm = norm + 0.25 * (ft1["model.norm.weight"] - base["norm.weight"])
    torch.testing.assert_close(got["norm.weight"], norm, rtol=0, atol=1e-6)
    emb = base["embed_tokens.weight"]
    by_hand = emb + 0.25 * (ft1["model.embed_tokens.weight"] - emb)
    torch.testing.assert_close(got["embed_tokens.weight"], by_hand, rtol=0, atol=1e-6)


def test_without_prefix_the_names_do_not_meet(bare):
    recipe = _recipe(bare)
    for m in recipe["models"]:
        del m["tensor_prefix"]
    with pytest.raises(SpliceError, match=r"lacks, e.g. \[.model.embed_tokens"):
        plan_merge(parse_recipe(recipe)).close()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({}, "has tensors that .* lacks, e.g. \\['score.weight'\\]"),  # on_missing: error
        ({"base_model": None}, "tensor_prefix: names the base's tensors"),
        ({"models.0.data": "x.jsonl"}, "tensor_prefix cannot be combined"),
        ({"models.1.model": "FT0", "models.1.tensor_prefix": "m."}, "two tensor_prefix"),
        ({"models.0.tensor_prefix": ""}, "tensor_prefix"),
    ],
)
def test_refusals(bare, change, message):
    recipe = _recipe(bare)
    for key, value in change.items():
        parts = key.split(".")
        if len(parts) == 1:
            recipe[key] = value
            continue
        value = bare["ft0"] if value == "FT0" else value
        recipe[parts[0]][int(parts[1])][parts[2]] = value
    with pytest.raises(SpliceError, match=message):
        plan_merge(parse_recipe(recipe)).close()
