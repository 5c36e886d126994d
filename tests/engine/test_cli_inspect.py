"""`splice inspect`: listing and per-tensor comparison values."""

import torch
from tiny_models import tiny_tensors, write_folder

from splice.cli import main


def test_inspect_lists_tensors_and_totals(tmp_path, capsys):
    t = tiny_tensors(0)
    p = write_folder(tmp_path / "m", t)
    assert main(["inspect", p]) == 0
    out = capsys.readouterr().out
    row = next(x for x in out.splitlines() if x.startswith("model.layers.2.mlp.up_proj.weight"))
    assert row.split()[1:] == ["[12,", "8]", "float32"]
    n = sum(v.numel() for v in t.values())
    assert f"{len(t)} tensors, {n:,} parameters" in out


def test_inspect_compares_two_checkpoints_with_known_values(tmp_path, capsys):
    a = {"w": torch.tensor([3.0, 4.0]), "only_a": torch.zeros(1)}
    b = {"w": torch.tensor([3.0, 4.0]) * 2, "only_b": torch.zeros(1)}
    pa, pb = write_folder(tmp_path / "a", a), write_folder(tmp_path / "b", b)
    assert main(["inspect", pa, pb]) == 0
    out = capsys.readouterr().out
    # |b - a| = |(3, 4)| = 5; relative 5 / 5 = 1; cos = 1
    row = next(line for line in out.splitlines() if line.startswith("w "))
    assert row.split()[1:] == ["5", "1", "1.00000"]
    assert "only in first: only_a" in out and "only in second: only_b" in out


def test_inspect_missing_path_is_a_clear_error(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 1
    assert "does not exist" in capsys.readouterr().err
