"""Data-aware methods from a recipe: `statistics:` per model, the streaming engine gives the
same tensors as `merge_with_statistics`, and the recipe errors."""

from __future__ import annotations

import pytest
import torch
import yaml

from splice.cli import main
from splice.merge.data_merge import merge_with_statistics
from splice.merge.data_stats import save_statistics
from splice.reference import open_checkpoint


def _load(path):
    r = open_checkpoint(str(path))
    try:
        return {n: r.read(n) for n in r.names()}
    finally:
        r.close()


def _grams(tensors, seed):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in tensors.items():
        if name.endswith("_proj.weight"):
            x = torch.randn(20, t.shape[1], generator=g)
            out[name] = x.T @ x / 20
    return out


def _fishers(tensors, seed):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(t.shape, generator=g) for n, t in tensors.items()}


def _run(tmp_path, recipe):
    rp = tmp_path / "recipe.yaml"
    rp.write_text(yaml.safe_dump(recipe))
    return main(["merge", str(rp), "--out", str(tmp_path / "merged"), "--quiet"])


@pytest.mark.parametrize(
    ("method", "collect", "params"),
    [("regmean", _grams, {"alpha": 0.8}), ("fisher", _fishers, {})],
)
def test_recipe_matches_python_api(models, tmp_path, method, collect, params):
    names = ["ft0", "ft1"]
    stats = [collect(models["tensors"][n], seed) for seed, n in enumerate(names)]
    entries = []
    for n, s in zip(names, stats, strict=True):
        save_statistics(s, tmp_path / f"{n}.safetensors")
        entries.append({"model": models[n], "statistics": str(tmp_path / f"{n}.safetensors")})
    recipe = {"method": method, "models": entries, "parameters": params}
    assert _run(tmp_path, recipe) == 0
    merged = _load(tmp_path / "merged")
    sds = [models["tensors"][n] for n in names]
    expected = merge_with_statistics(method, sds, stats, **params)
    assert set(merged) == set(expected)
    for n in expected:
        assert torch.allclose(merged[n], expected[n], atol=1e-6), n
    # not the plain average: the statistics were used
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(merged[q], (sds[0][q] + sds[1][q]) / 2, atol=1e-4)


def test_recipe_statistics_errors(models, tmp_path, capsys):
    s = _grams(models["tensors"]["ft0"], 0)
    save_statistics(s, tmp_path / "g.safetensors")
    bad = dict(s)
    bad["model.layers.0.mlp.up_proj.weight"] = torch.eye(3)
    save_statistics(bad, tmp_path / "bad.safetensors")
    good = {"model": models["ft0"], "statistics": str(tmp_path / "g.safetensors")}
    cases = [
        ({"method": "regmean", "models": [good, {"model": models["ft1"]}]}, "needs `statistics:`"),
        (
            {"method": "linear", "models": [good, {"model": models["ft1"]}]},
            "reads no statistics",
        ),
        (
            {
                "method": "regmean",
                "models": [
                    good,
                    {"model": models["ft1"], "statistics": str(tmp_path / "bad.safetensors")},
                ],
            },
            "expected (8, 8)",
        ),
        (
            {
                "method": "regmean",
                "models": [
                    good,
                    {"model": models["ft1"], "statistics": str(tmp_path / "no.safetensors")},
                ],
            },
            "cannot read statistics",
        ),
    ]
    for recipe, fragment in cases:
        assert _run(tmp_path, recipe) == 1
        err = capsys.readouterr().err
        assert err.startswith("splice: error: ") and fragment in err, err
        assert not (tmp_path / "merged").exists()


def test_plan_merge_without_a_collector_refuses_data_entries(models):
    from splice.engine import plan_merge
    from splice.errors import MergeValidationError
    from splice.recipe.schema import parse_recipe

    entries = [{"model": models[n], "data": "texts.jsonl"} for n in ("ft0", "ft1")]
    recipe = parse_recipe({"method": "regmean", "models": entries}, "recipe")
    with pytest.raises(MergeValidationError, match=r"models\[0\]\.data: .*collect="):
        plan_merge(recipe)
    seen = []

    def collect(with_data, kind):  # the engine hands every data entry over, once
        seen.append(([i for i, _ in with_data], kind))
        return {i: _grams(models["tensors"][f"ft{i}"], i) for i, _ in with_data}

    plan = plan_merge(recipe, collect=collect)
    assert seen == [([0, 1], "gram")] and plan.data is not None
    for r in plan.readers.values():
        r.close()
