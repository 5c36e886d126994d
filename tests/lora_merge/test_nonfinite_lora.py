"""`splice lora ...` and NaN / ±inf: flags refused before any adapter is read, adapter
configs with a non-finite lora_alpha refused, non-finite factors / checkpoints refused
naming the tensor unless --allow-nonfinite (issue 9, "non-finite numbers accepted").

Adapters and checkpoints are written by hand (safetensors + JSON): small and fast."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from splice.cli import main

NAN, INF = float("nan"), float("inf")
MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj")


def _adapter(path: Path, seed: int, *, alpha=8.0, poison: float | None = None) -> str:
    """A PEFT LoRA folder (r=2) on two 8 x 8 modules; ``poison`` goes into one lora_A."""
    path.mkdir()
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for m in MODULES:
        tensors[f"base_model.model.{m}.lora_A.weight"] = torch.randn(2, 8, generator=g)
        tensors[f"base_model.model.{m}.lora_B.weight"] = torch.randn(8, 2, generator=g)
    if poison is not None:
        tensors[f"base_model.model.{MODULES[1]}.lora_A.weight"][1, :2] = poison
    save_file(tensors, str(path / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": alpha, "target_modules": ["q_proj"]}
    (path / "adapter_config.json").write_text(json.dumps(cfg))  # NaN -> JSON's NaN
    return str(path)


def _err(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("splice: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def adapters(tmp_path):
    return _adapter(tmp_path / "a1", 1), _adapter(tmp_path / "a2", 2)


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--method", "concat", "--weights", "1,nan"], "weights[1] = nan must be a finite number"),
        (["--method", "concat", "--weights", "inf 1"], "weights[0] = inf must be a finite number"),
        (["--method", "svd", "--lambda", "inf"], "lambda = inf must be a finite number"),
        (["--method", "svd", "--lambda=-inf"], "lambda = -inf must be a finite number"),
        (["--method", "ties", "--lambda", "nan"], "lambda = nan must be a finite number"),
        (["--method", "ties", "--density", "nan"], "density = nan must be a finite number"),
        (
            ["--method", "ties", "--density", "1.5"],
            "'density' = [1.5] is invalid: Input should be less than or equal to 1",
        ),
        (
            ["--method", "svd", "--rank", "0"],
            "'rank' = 0 is invalid: Input should be greater than or equal to 1",
        ),
    ],
)
def test_lora_merge_flags(flags, expected, adapters, tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["lora", "merge", *flags, *adapters, "--out", str(out)]) == 1
    assert expected in _err(capsys)
    assert not out.exists()


def test_lora_merge_flags_refused_before_reading_adapters(tmp_path, capsys):
    missing = [str(tmp_path / "nope1"), str(tmp_path / "nope2")]
    argv = ["lora", "merge", "--method", "concat", "--weights", "1,nan", *missing]
    assert main([*argv, "--out", str(tmp_path / "m")]) == 1
    assert "weights[1] = nan" in _err(capsys)


@pytest.mark.parametrize("alpha", [NAN, INF, -INF])
def test_lora_merge_refuses_a_nonfinite_lora_alpha(alpha, tmp_path, capsys):
    a1, a2 = _adapter(tmp_path / "a1", 1), _adapter(tmp_path / "a2", 2, alpha=alpha)
    out = tmp_path / "m"
    assert main(["lora", "merge", "--method", "concat", a1, a2, "--out", str(out)]) == 1
    line = _err(capsys)
    assert f"{a2}/adapter_config.json: 'lora_alpha' = {alpha} must be a finite number" in line
    assert not out.exists()


def test_lora_merge_refuses_nonfinite_factors_unless_allowed(tmp_path, capsys):
    a1, a2 = _adapter(tmp_path / "a1", 1), _adapter(tmp_path / "a2", 2, poison=NAN)
    out = tmp_path / "m"
    argv = ["lora", "merge", "--method", "concat", a1, a2, "--out", str(out)]
    assert main(argv) == 1
    key = f"base_model.model.{MODULES[1]}.lora_A.weight"
    assert f"{a2}: tensor '{key}' has 2 non-finite values (2 NaN)" in _err(capsys)
    assert not out.exists()
    assert main([*argv, "--allow-nonfinite"]) == 0
    merged = load_file(str(out / "adapter_model.safetensors"))
    assert int(merged[key].isnan().sum()) == 2  # concat keeps a2's rows as they were
    # an SVD-based method cannot work on them: one error naming the module, no traceback
    argv = ["lora", "merge", "--method", "svd", a1, a2, "--out", str(tmp_path / "s")]
    assert main([*argv, "--allow-nonfinite"]) == 1
    assert f"module '{MODULES[1]}': method 'lora:svd'" in _err(capsys)


def test_compeft_and_rmm_refuse(tmp_path, capsys):
    good, bad = _adapter(tmp_path / "a1", 1), _adapter(tmp_path / "a2", 2, poison=-INF)
    out = tmp_path / "c"
    for flags, expected in [
        (["--density", "0.5", "--alpha", "nan"], "'alpha' = nan is invalid: Input should be a fin"),
        (["--density", "0.5", "--alpha", "inf"], "'alpha' = inf is invalid: Input should be a fin"),
        (["--density", "nan"], "'density' = nan is invalid: Input should be a finite number"),
    ]:
        assert main(["lora", "compeft", good, *flags, "--out", str(out)]) == 1
        assert expected in _err(capsys)
    assert main(["lora", "compeft", bad, "--density", "0.5", "--out", str(out)]) == 1
    assert f"{bad}: tensor 'base_model.model.{MODULES[1]}.lora_A.weight'" in _err(capsys)
    assert main(["lora", "rmm", good, bad, "--k", "1", "--out", str(out)]) == 1
    assert "has 2 non-finite values (2 inf)" in _err(capsys)
    assert not out.exists()
    assert main(["lora", "rmm", good, bad, "--k", "0", "--out", str(out)]) == 1
    assert "k = 0 must be between 1" in _err(capsys)


def _checkpoint(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"))
    return str(path)


def test_lora_extract_refuses_nonfinite_checkpoints(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    base = {f"{m}.weight": torch.randn(8, 8, generator=g) for m in MODULES}
    ft = {n: v + 0.1 * torch.randn(8, 8, generator=g) for n, v in base.items()}
    b = _checkpoint(tmp_path / "base", base)
    name = f"{MODULES[0]}.weight"
    bad_ft = _checkpoint(tmp_path / "ft", {**ft, name: ft[name].clone().fill_(NAN)})
    out = tmp_path / "x"
    argv = ["lora", "extract", "--base", b, "--model", bad_ft, "--rank", "2", "--out", str(out)]
    assert main(argv) == 1
    assert f"{bad_ft}: tensor '{name}' has 64 non-finite values (64 NaN)" in _err(capsys)
    assert not out.exists()
    # with the opt-in the SVD of a NaN delta is undefined: one error, not a traceback
    assert main([*argv, "--allow-nonfinite"]) == 1
    assert f"'{name}':" in _err(capsys) and not out.exists()
    for energy in ("nan", "inf", "0.0"):
        argv = ["lora", "extract", "--base", b, "--model", b, "--energy", energy]
        assert main([*argv, "--out", str(out)]) == 1
        assert f"energy = {energy} must be in (0, 1]" in _err(capsys)
