"""Fast Fisher Grafting from a recipe: a base model and a `statistics:` Fisher per model; the
engine's tensors equal the method applied by hand to each tensor."""

from __future__ import annotations

import torch
import yaml

from splice.cli import main
from splice.merge import MergeContext, get_method
from splice.merge.data_stats import save_statistics
from splice.merge.stats import DataStatistic, DataStats
from splice.reference import open_checkpoint

FISHER = DataStatistic("fisher")


def _graft(base, thetas, fishers, **params):
    ctx = MergeContext(
        tensor_name="t", model_stats={FISHER: DataStats(tuple(fishers), (1.0,) * len(fishers))}
    )
    return get_method("fisher_graft")(base.clone(), [t.clone() for t in thetas], ctx, **params)


def test_from_a_recipe(models, tmp_path):
    names = ["ft0", "ft1"]
    g = torch.Generator().manual_seed(1)
    stats = [
        {n: torch.rand(t.shape, generator=g) for n, t in models["tensors"][m].items()}
        for m in names
    ]
    entries = []
    for m, s in zip(names, stats, strict=True):
        save_statistics(s, tmp_path / f"{m}.safetensors")
        entries.append({"model": models[m], "statistics": str(tmp_path / f"{m}.safetensors")})
    recipe = {
        "method": "fisher_graft",
        "base_model": models["base"],
        "models": entries,
        "parameters": {"density": 0.3},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "m"), "--quiet"]) == 0
    r = open_checkpoint(str(tmp_path / "m"))
    base = models["tensors"]["base"]
    changed = 0
    for n in base:
        expected = _graft(
            base[n], [models["tensors"][m][n] for m in names], [s[n] for s in stats], density=0.3
        )
        assert torch.allclose(r.read(n), expected, atol=1e-6), n
        full = base[n] + sum(models["tensors"][m][n] - base[n] for m in names)
        changed += not torch.allclose(expected, full, atol=1e-6)
    r.close()
    assert changed  # the grafting dropped entries
