"""AdaMerging with a bare backbone base: the pretrained model saved without its
architecture's prefix (a `BertModel`'s `embeddings.…`, here a Llama base's tensors without
`model.`) while the experts are classifiers (`model.…` plus a head). The λ equal those
learned on the prefixed base (the same values); the written recipe gives each model
`tensor_prefix: model.` and `splice merge` writes the base's own names with θ0 + Σ λ τ."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import test_adamerging_cli as plain
import torch
import yaml
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parents[1]))
from splice.cli import main

pool = plain.pool
odd = plain.odd


def _bare_recipe(pool, odd, tmp_path: Path) -> Path:
    doc = yaml.safe_load(pool["recipe"].read_text())
    doc["base_model"] = str(odd["bare"])
    out = tmp_path / "bare.yaml"
    out.write_text(yaml.safe_dump(doc))
    return out


@pytest.mark.parametrize(
    ("objective", "granularity", "density"),
    [("adamerging", "task", None), ("adamerging", "layer", None), ("adamerging++", "task", 0.2)],
)
def test_bare_base_learns_the_same_lambdas_and_merges_under_its_names(
    pool, odd, tmp_path, capsys, objective, granularity, density
):
    out, merged_dir = tmp_path / "l.yaml", tmp_path / "merged"
    argv = ["search", str(_bare_recipe(pool, odd, tmp_path)), "--objective", objective]
    argv += ["--out", str(out), *plain.STEPS, "--granularity", granularity]
    assert main([*argv, "--merged", str(merged_dir), "--quiet", "--json"]) == 0
    printed = capsys.readouterr().out
    record = json.loads(printed[printed.index("{") :])
    rows = [record["coefficients"][str(pool[f"e{i}"])] for i in range(2)]
    if granularity == "layer":
        assert list(rows[0]) == [n for n in rows[0] if n.startswith("model.")]  # experts' names
    got_lam = torch.tensor(rows if granularity == "task" else [list(r.values()) for r in rows])
    expected = plain._python_lambdas(pool, granularity, ties_density=density)
    assert torch.equal(got_lam, expected.to(got_lam.dtype))  # as on the prefixed base

    recipe = yaml.safe_load(out.read_text())
    assert [m["tensor_prefix"] for m in recipe["models"]] == ["model.", "model."]
    again = tmp_path / "again"
    assert main(["merge", str(out), "--out", str(again), "--quiet"]) == 0
    got = load_file(str(again / "model.safetensors"))
    bare = load_file(str(odd["bare"] / "model.safetensors"))
    experts = [load_file(str(pool[f"e{i}"] / "model.safetensors")) for i in range(2)]
    assert set(got) == set(bare)  # the base's own names, no head
    assert torch.equal(got["position_ids"], bare["position_ids"])  # copied from the base
    bare = {n: t for n, t in bare.items() if t.is_floating_point()}
    if density is None:
        tau = [{n: e["model." + n] - bare[n] for n in bare} for e in experts]
    else:  # the hand TIES of the ++ test, on the prefixed names
        from test_adamerging_plus_cli import _ties_by_hand

        prefixed = {"model." + n: t for n, t in bare.items()}
        trimmed = _ties_by_hand(prefixed, experts, list(prefixed), density)
        tau = [{n.removeprefix("model."): t for n, t in k.items()} for k in trimmed]
    for n in tau[0]:
        by_hand = bare[n].clone()
        for k in range(2):
            weight = rows[k] if granularity == "task" else rows[k]["model." + n]
            by_hand += weight * tau[k][n]
        assert torch.allclose(got[n], by_hand, rtol=0, atol=1e-6), n
    merged = load_file(str(merged_dir / "model.safetensors"))
    assert set(merged) == set(got) and all(torch.equal(merged[n], got[n]) for n in got)
