"""`splice search` with the causal-LM loss objective on tiny Llama folders: the best recipe
written, `splice merge` reproducing the searched loss exactly; errors before any merge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from cli_checks import fails_cleanly
from splice.cli import main
from splice.train.lm_objective import LMLossObjective, lm_examples
from tiny_hf import save_tiny_llama_folder

TEXT = "the cat sat on the mat.\nabc abc abc.\n\nhello world!\n"


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama base and two 'fine-tunes' (base + seeded noise), a data file, a recipe."""
    root = tmp_path_factory.mktemp("search-cli")
    base = save_tiny_llama_folder(root / "base")
    out = {"base": base}
    weights = load_file(str(base / "model.safetensors"))
    for i in range(2):
        g = torch.Generator().manual_seed(i)
        ft = {n: t + 0.05 * torch.randn(t.shape, generator=g) for n, t in weights.items()}
        folder = root / f"ft{i}"
        folder.mkdir()
        save_file(ft, str(folder / "model.safetensors"))
        (folder / "config.json").write_text((base / "config.json").read_text())
        out[f"ft{i}"] = folder
    (root / "val.txt").write_text(TEXT)
    out["data"] = root / "val.txt"
    recipe = {
        "method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(out["ft0"])}, {"model": str(out["ft1"])}],
        "dtype": "float32",
    }
    out["recipe"] = root / "ta.yaml"
    out["recipe"].write_text(yaml.safe_dump(recipe))
    return out


def test_search_writes_a_recipe_that_merge_reproduces(pool, tmp_path: Path, capsys):
    best = tmp_path / "best.yaml"
    argv = ["search", str(pool["recipe"]), "--data", str(pool["data"]), "--out", str(best)]
    assert main([*argv, "--budget", "6", "--quiet", "--json", "--max-length", "32"]) == 0
    printed = capsys.readouterr().out
    record = json.loads(printed[printed.index("{") :])
    assert record["evaluations"] == 6 and record["value"] <= record["start_value"]
    weights = [m["parameters"]["weight"] for m in yaml.safe_load(best.read_text())["models"]]
    assert weights == list(record["coefficients"].values())
    merged = tmp_path / "merged"
    assert main(["merge", str(best), "--out", str(merged), "--quiet"]) == 0
    objective = LMLossObjective.from_file(str(merged), pool["data"], max_length=32)
    state = load_file(str(merged / "model.safetensors"))
    assert objective(state) == record["value"]  # the same merged bits, the same loss


def test_txt_examples_are_the_non_empty_lines(pool):
    texts = [e.completion for e in lm_examples(pool["data"])]
    assert texts == ["the cat sat on the mat.", "abc abc abc.", "hello world!"]


@pytest.mark.parametrize(
    ("extra", "data", "message"),
    [
        (["--budget", "0"], TEXT, "--budget"),
        ([], "\n\n", "no text"),
        (["--bounds", "1,0"], TEXT, "--bounds"),
        (["--bounds", "a,b"], TEXT, "--bounds"),
        (["--layer-groups", "9"], TEXT, "layer_groups = 9"),
        (["--parameter", "density"], TEXT, "no per-model number 'density'"),
    ],
)
def test_errors_before_any_merge(pool, tmp_path: Path, capsys, extra, data, message):
    (tmp_path / "d.txt").write_text(data)
    argv = ["search", str(pool["recipe"]), "--data", str(tmp_path / "d.txt")]
    err = fails_cleanly([*argv, "--out", str(tmp_path / "b.yaml"), *extra], capsys)
    assert message in err
    assert not (tmp_path / "b.yaml").exists()


def test_a_method_without_weights_is_refused(pool, tmp_path: Path, capsys):
    recipe = yaml.safe_load(pool["recipe"].read_text())
    recipe["method"] = "magmax"
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    argv = ["search", str(tmp_path / "r.yaml"), "--data", str(pool["data"])]
    err = fails_cleanly([*argv, "--out", str(tmp_path / "b.yaml")], capsys)
    assert "no per-model number 'weight'" in err


@pytest.mark.parametrize("content", [None, b"", b"- a\n- b\n", b"method: [x\n"])
def test_bad_recipe_files(pool, tmp_path: Path, capsys, content):
    recipe = tmp_path / "r.yaml"
    if content is not None:
        recipe.write_bytes(content)
    argv = ["search", str(recipe), "--data", str(pool["data"]), "--out", str(tmp_path / "b")]
    fails_cleanly(argv, capsys)
