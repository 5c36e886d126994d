"""`splice search --objective adamerging++`: AdaMerging on the TIES-processed task vectors.
The λ equal the Python `adamerging(..., ties_density=)` call's; the written `method: ties`
recipe, run by `splice merge`, gives θ0 + Σ_k λ_k τ̂_k with τ̂_k trimmed, elected and
disjoint-merged by hand; bad densities and heads fail before any training."""

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
from cli_checks import fails_cleanly, no_output
from splice.cli import main

pool = plain.pool  # the same tiny Llama pool: a causal-LM base, two classifier experts
odd = plain.odd
STEPS = plain.STEPS


def _argv(pool, out: Path, granularity: str, *extra: str) -> list[str]:
    argv = ["search", str(pool["recipe"]), "--objective", "adamerging++", "--out", str(out)]
    return [*argv, *STEPS, "--granularity", granularity, "--quiet", "--json", *extra]


def _ties_by_hand(base: dict, experts: list[dict], names: list[str], density: float) -> list:
    """τ̂_k: τ_k's round(density · N) largest |entries| over all of `names` (no ties in
    these random values), the sign of Σ_k τ̂_k elected (+ at 0), the others zeroed."""
    taus = [torch.cat([(e[n] - base[n]).reshape(-1) for n in names]) for e in experts]
    keep = round(density * taus[0].numel())
    trimmed = []
    for t in taus:
        mask = torch.zeros_like(t, dtype=torch.bool)
        mask[t.abs().topk(keep).indices] = True
        trimmed.append(t * mask)
    sign = torch.where(sum(trimmed) >= 0, 1.0, -1.0)
    flat = [t * (t * sign > 0) for t in trimmed]
    out, start = [], 0
    for t in flat:
        per, start = {}, 0
        for n in names:
            per[n] = t[start : start + base[n].numel()].reshape(base[n].shape)
            start += base[n].numel()
        out.append(per)
    return out


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_plus_plus_lambdas_equal_the_python_call(pool, tmp_path, capsys, granularity):
    assert main(_argv(pool, tmp_path / "l.yaml", granularity)) == 0
    printed = capsys.readouterr().out
    record = json.loads(printed[printed.index("{") :])
    assert record["objective"] == "adamerging++" and record["density"] == 0.2  # the paper's
    rows = [record["coefficients"][str(pool[f"e{i}"])] for i in range(2)]
    got = torch.tensor(rows if granularity == "task" else [list(r.values()) for r in rows])
    expected = plain._python_lambdas(pool, granularity, ties_density=0.2)
    assert torch.equal(got, expected.to(got.dtype))
    assert not torch.equal(expected, plain._python_lambdas(pool, granularity))  # ++ differs


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_written_ties_recipe_merges_to_theta0_plus_lambda_trimmed_tau(
    pool, tmp_path, capsys, granularity
):
    out, merged_dir = tmp_path / "l.yaml", tmp_path / "merged"
    argv = _argv(pool, out, granularity, "--density", "0.3", "--merged", str(merged_dir))
    assert main(argv) == 0
    printed = capsys.readouterr().out
    record = json.loads(printed[printed.index("{") :])
    recipe = yaml.safe_load(out.read_text())
    assert recipe["method"] == "ties" and recipe["on_missing"] == "base"
    assert recipe["parameters"] == {
        "scope": "model",
        "majority": "sum",
        "weighted_votes": False,
        "disjoint": "sum",
    }
    assert all(m["parameters"]["density"] == 0.3 and "data" not in m for m in recipe["models"])
    again = tmp_path / "again"
    assert main(["merge", str(out), "--out", str(again), "--quiet"]) == 0
    got = load_file(str(again / "model.safetensors"))
    base = load_file(str(pool["base"] / "model.safetensors"))
    experts = [load_file(str(pool[f"e{i}"] / "model.safetensors")) for i in range(2)]
    names = [n for n in base if n.startswith("model.")]
    trimmed = _ties_by_hand(base, experts, names, 0.3)
    kept = sum(int((t[n] != 0).sum()) for t in trimmed for n in names)
    total = sum(base[n].numel() for n in names)
    assert 0 < kept < 2 * round(0.3 * total)  # trimmed, and some entries dropped by sign
    lam = [record["coefficients"][str(pool[f"e{i}"])] for i in range(2)]
    assert set(got) == set(base) and torch.equal(got["lm_head.weight"], base["lm_head.weight"])
    for n in names:
        by_hand = base[n].clone()
        for k in range(2):
            by_hand += (lam[k] if granularity == "task" else lam[k][n]) * trimmed[k][n]
        assert torch.allclose(got[n], by_hand, rtol=0, atol=1e-6), n
    merged = load_file(str(merged_dir / "model.safetensors"))  # --merged = `splice merge`
    assert set(merged) == set(got) and all(torch.equal(merged[n], got[n]) for n in got)
    # the election on the unweighted vectors matters: TIES's weighted vote merges otherwise
    recipe["parameters"]["weighted_votes"] = True
    (tmp_path / "w.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(tmp_path / "w.yaml"), "--out", str(tmp_path / "w"), "--quiet"]) == 0
    weighted = load_file(str(tmp_path / "w" / "model.safetensors"))
    assert any(not torch.allclose(weighted[n], got[n], rtol=0, atol=1e-6) for n in names)


@pytest.mark.parametrize(
    ("objective", "flags", "message"),
    [
        ("adamerging++", ["--density", "0"], "--density = 0.0 must be in (0, 1]"),
        ("adamerging++", ["--density", "1.5"], "--density = 1.5 must be in (0, 1]"),
        ("adamerging++", ["--density", "nan"], "--density = nan must be a finite number"),
        ("adamerging", ["--density", "0.2"], "--density applies to --objective adamerging++"),
    ],
)
def test_bad_density_fails_before_any_training(
    pool, tmp_path, capsys, monkeypatch, objective, flags, message
):
    import splice.train.adamerging as ada
    import splice.train.models as models

    def never(*a, **k):
        raise AssertionError("a model was loaded or trained")

    monkeypatch.setattr(ada, "adamerging", never)
    monkeypatch.setattr(models, "load_for_task", never)
    out, merged = tmp_path / "l.yaml", tmp_path / "m"
    argv = ["search", str(pool["recipe"]), "--objective", objective, "--out", str(out)]
    err = fails_cleanly([*argv, "--merged", str(merged), "--quiet", *flags], capsys)
    assert message in err, err
    no_output(out, merged)


def test_density_with_lm_loss_is_refused(pool, capsys):
    argv = ["search", str(pool["recipe"]), "--out", str(pool["root"] / "x.yaml")]
    err = fails_cleanly([*argv, "--data", str(pool["d0"]), "--density", "0.2"], capsys)
    assert "--density applies to --objective adamerging++, not lm-loss" in err


def test_a_head_the_base_shares_stays_out_of_the_trim(tmp_path, capsys):
    """A classifier base shares `score.weight` (the experts' name and shape): the written
    recipe gives it density 1 and weight 0, so `splice merge` trims over the backbone alone
    (as AdaMerging++ does) and writes the base's head; the backbone is θ0 + Σ_k λ_k τ̂_k with
    τ̂_k trimmed over the backbone's entries only."""
    base_dir = plain.save_tiny_llama_classifier_folder(tmp_path / "base", seed=0)
    base = load_file(str(base_dir / "model.safetensors"))
    models = []
    for i in range(2):
        e = plain._expert(tmp_path, i, base, ("neg", "pos"))
        (tmp_path / f"t{i}.jsonl").write_text(json.dumps({"text": plain.TEXTS[i]}) + "\n")
        models.append({"model": str(e), "data": str(tmp_path / f"t{i}.jsonl")})
    recipe = plain._recipe(tmp_path / "r.yaml", base_dir, models)
    out = tmp_path / "l.yaml"
    argv = ["search", str(recipe), "--objective", "adamerging++", "--out", str(out)]
    assert main([*argv, "--steps", "2", "--granularity", "task", "--quiet", "--json"]) == 0
    printed = capsys.readouterr().out
    record = json.loads(printed[printed.index("{") :])
    written = yaml.safe_load(out.read_text())
    heads = {"filter": "re:^(?:score\\.weight)$", "value": 1.0}
    assert all(m["parameters"]["density"] == [heads, {"value": 0.2}] for m in written["models"])
    assert main(["merge", str(out), "--out", str(tmp_path / "m"), "--quiet"]) == 0
    got = load_file(str(tmp_path / "m" / "model.safetensors"))
    experts = [load_file(str(Path(m["model"]) / "model.safetensors")) for m in models]
    assert torch.equal(got["score.weight"], base["score.weight"])
    names = [n for n in base if n.startswith("model.")]
    trimmed = _ties_by_hand(base, experts, names, 0.2)
    lam = [record["coefficients"][m["model"]] for m in models]
    for n in names:
        by_hand = base[n] + lam[0] * trimmed[0][n] + lam[1] * trimmed[1][n]
        assert torch.allclose(got[n], by_hand, rtol=0, atol=1e-6), n
