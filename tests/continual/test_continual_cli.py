"""`splice merge --continual`: two steps through the CLI, and its usage errors."""

import json

import pytest
import torch
from safetensors.torch import save_file

from splice.cli import main
from splice.reference import open_checkpoint


def folder(path, value):
    path.mkdir()
    save_file(
        {"model.layers.0.mlp.weight": torch.full((2, 2), value)}, str(path / "model.safetensors")
    )
    return str(path)


def test_two_steps(tmp_path, capsys):
    b, m1, m2 = (folder(tmp_path / n, v) for n, v in [("b", 0.0), ("m1", 1.0), ("m2", 3.0)])
    s1, s2 = str(tmp_path / "s1"), str(tmp_path / "s2")
    assert main(["merge", "--continual", "none", "--base", b, "--add", m1, "--out", s1]) == 0
    assert main(["merge", "--continual", s1, "--base", b, "--add", m2, "--out", s2]) == 0
    assert "merged model 2" in capsys.readouterr().out
    state = json.loads((tmp_path / "s2" / "splice_continual.json").read_text())
    assert state["task_vector_norms"] == [2.0, 6.0]  # ‖1·ones(2,2)‖ = 2, ‖3·ones‖ = 6
    # step 2: τ̄ = ones has σ = (2, 0), u₁ = v₁ = (1, 1)/√2. τ = 3·ones lies entirely on that
    # pair: Uᵀ τ V = diag(±6, 0), whose diagonal is removed, so τ' = 0 and u = 1·ones.
    # ‖u‖ = 2, mean norm (2 + 6)/2 = 4 -> merged τ̄ = ones · 4/2 = 2·ones; λ = ‖u‖/4 = 0.5
    r = open_checkpoint(s2)
    torch.testing.assert_close(r.read("model.layers.0.mlp.weight"), torch.full((2, 2), 2.0))
    r.close()
    assert state["lambda"] == pytest.approx(0.5)


def test_usage_errors(tmp_path, capsys):
    assert main(["merge", "--out", str(tmp_path / "o")]) == 1
    assert "needs a recipe, or --continual" in capsys.readouterr().err
    assert main(["merge", "--continual", "none", "--out", str(tmp_path / "o")]) == 1
    assert "needs --base BASE and --add MODEL" in capsys.readouterr().err
    assert main(["merge", "r.yaml", "--continual", "none", "--out", str(tmp_path / "o")]) == 1
    assert "takes no recipe" in capsys.readouterr().err
