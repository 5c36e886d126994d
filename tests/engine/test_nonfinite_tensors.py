"""Tensors holding NaN / ±inf: a one-line error naming the tensor and the model by default,
`--allow-nonfinite` to pass them through; float16 overflow in the output reported the same
way. `splice inspect` still shows such tensors (issue 9, "non-finite numbers accepted").

Fixture folders with NaN are written with safetensors directly (splice's own writer refuses
non-finite values)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from tiny_models import CONFIG

from splice.cli import main

NAN, INF = float("nan"), float("inf")
Q0 = "model.layers.0.self_attn.q_proj.weight"
UP2 = "model.layers.2.mlp.up_proj.weight"


def _folder(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    path.mkdir(parents=True)
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(CONFIG))
    return str(path)


def _poisoned(models, which: str, tmp_path: Path, name=Q0, value=NAN, count=3) -> str:
    t = {n: v.clone() for n, v in models["tensors"][which].items()}
    t[name].view(-1)[:count] = value
    return _folder(tmp_path / f"{which}-bad", t)


def _recipe(tmp_path: Path, data: dict) -> str:
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(data))
    return str(p)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("splice: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _read(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize(
    "method, poisoned, value, name, shown",
    [
        ("task_arithmetic", "ft0", NAN, Q0, "3 non-finite values (3 NaN)"),
        ("task_arithmetic", "ft1", INF, UP2, "3 non-finite values (3 inf)"),
        ("task_arithmetic", "base", -INF, UP2, "3 non-finite values (3 inf)"),
        ("ties", "ft1", NAN, UP2, "3 non-finite values (3 NaN)"),  # whole-model statistics
        ("linear", "ft0", INF, Q0, "3 non-finite values (3 inf)"),  # no base
    ],
)
def test_merge_refuses_nonfinite_inputs(
    method, poisoned, value, name, shown, models, tmp_path, capsys
):
    bad = _poisoned(models, poisoned, tmp_path, name, value)
    refs = {k: models[k] for k in ("base", "ft0", "ft1")}
    refs[poisoned] = bad
    recipe = {"method": method, "models": [{"model": refs["ft0"]}, {"model": refs["ft1"]}]}
    if method != "linear":
        recipe["base_model"] = refs["base"]
    if method == "ties":
        recipe["parameters"] = {"density": 0.5}
    out = tmp_path / "merged"
    assert main(["merge", _recipe(tmp_path, recipe), "--out", str(out), "--quiet"]) == 1
    line = _one_line_error(capsys)
    assert f"{bad}: tensor '{name}' has {shown}" in line
    assert "--allow-nonfinite" in line
    assert not out.exists()


def test_allow_nonfinite_passes_values_through(models, tmp_path, capsys):
    bad = _poisoned(models, "ft0", tmp_path)
    recipe = {
        "method": "task_arithmetic",
        "base_model": models["base"],
        "models": [{"model": bad}, {"model": models["ft1"]}],
    }
    out = tmp_path / "merged"
    argv = ["merge", _recipe(tmp_path, recipe), "--out", str(out), "--quiet"]
    assert main([*argv, "--allow-nonfinite"]) == 0
    got = _read(out)
    t = models["tensors"]
    for n, base in t["base"].items():
        want = base + (t["ft0"][n] - base) + (t["ft1"][n] - base)
        if n == Q0:
            want.view(-1)[:3] = NAN
        torch.testing.assert_close(got[n], want, equal_nan=True)
    assert int(got[Q0].isnan().sum()) == 3


def test_float16_overflow_in_the_output_is_refused(models, tmp_path, capsys):
    """Finite float32 inputs whose merge exceeds float16's range (±65504)."""
    big = {n: torch.full_like(v, 4e4) for n, v in models["tensors"]["base"].items()}
    a = _folder(tmp_path / "a", big)
    b = _folder(tmp_path / "b", {**big, Q0: big[Q0] * 2})  # 8e4 in one tensor
    recipe = {"merge_method": "linear", "models": [{"model": a}, {"model": b}]}
    r = _recipe(tmp_path, recipe)
    out = tmp_path / "merged"
    # the mean 6e4 fits: fine
    assert main(["merge", r, "--out", str(out), "--dtype", "float16", "--quiet"]) == 0
    assert _read(out)[Q0].dtype == torch.float16
    recipe["models"][0]["parameters"] = {"weight": 0.0}  # the merge is b alone
    r = _recipe(tmp_path, {**recipe, "out_dtype": "float16"})
    out2 = tmp_path / "merged2"
    assert main(["merge", r, "--out", str(out2), "--quiet"]) == 1
    line = _one_line_error(capsys)
    assert f"output tensor '{Q0}' has 64 non-finite values (64 inf)" in line
    assert "in float16, whose range is ±65504" in line and "--allow-nonfinite" in line
    assert not out2.exists()
    assert main(["merge", r, "--out", str(out2), "--quiet", "--allow-nonfinite"]) == 0
    got = _read(out2)
    assert bool(got[Q0].isinf().all()) and bool((got[UP2] == 4e4).all())


def test_continual_merge_refuses_nonfinite(models, tmp_path, capsys):
    bad = _poisoned(models, "ft0", tmp_path, value=-INF)
    out = tmp_path / "state"
    argv = ["merge", "--continual", "none", "--base", models["base"], "--add", bad]
    assert main([*argv, "--out", str(out)]) == 1
    assert f"{bad}: tensor '{Q0}' has 3 non-finite values (3 inf)" in _one_line_error(capsys)
    assert not out.exists()
    argv = ["merge", "--continual", "none", "--base", bad, "--add", models["ft0"]]
    assert main([*argv, "--out", str(out)]) == 1
    assert f"{bad}: tensor '{Q0}'" in _one_line_error(capsys)
    argv = ["merge", "--continual", "none", "--base", models["base"], "--add", models["ft0"]]
    for alpha in ("nan", "inf"):
        assert main([*argv, "--alpha", alpha, "--out", str(out)]) == 1
        assert f"alpha = {alpha} is invalid: it must lie in [0, 1]" in _one_line_error(capsys)
    argv = ["merge", "--continual", "none", "--base", models["base"], "--add", bad]
    assert main([*argv, "--out", str(out), "--allow-nonfinite"]) == 0
    assert int(_read(out)[Q0].isinf().sum()) == 3


def test_opt_in_with_an_svd_method_is_one_error_not_a_traceback(models, tmp_path, capsys):
    bad = _poisoned(models, "ft1", tmp_path)
    recipe = {
        "method": "tsv",
        "base_model": models["base"],
        "models": [{"model": models["ft0"]}, {"model": bad}],
    }
    out = tmp_path / "merged"
    argv = ["merge", _recipe(tmp_path, recipe), "--out", str(out), "--quiet", "--allow-nonfinite"]
    assert main(argv) == 1
    line = _one_line_error(capsys)
    assert f"tensor '{Q0}': method 'tsv'" in line and "non-finite" in line
    assert not out.exists()


@pytest.mark.parametrize("method", ["tall", "emr"])
def test_compress_refuses_nonfinite(method, models, tmp_path, capsys):
    bad = _poisoned(models, "ft1", tmp_path, UP2, INF)
    out = tmp_path / "packed"
    argv = ["compress", method, "--base", models["base"], "--models", models["ft0"], bad]
    assert main([*argv, "--out", str(out)]) == 1
    assert f"{bad}: tensor '{UP2}' has 3 non-finite values (3 inf)" in _one_line_error(capsys)
    assert not out.exists()


def test_restore_refuses_a_nonfinite_base(models, tmp_path, capsys):
    packed = tmp_path / "packed"
    argv = ["compress", "tall", "--base", models["base"], "--models", models["ft0"]]
    assert main([*argv, models["ft1"], "--out", str(packed)]) == 0
    bad = _poisoned(models, "base", tmp_path)
    out = tmp_path / "restored"
    argv = ["restore", str(packed), "--task", "0", "--base", bad, "--out", str(out)]
    assert main(argv) == 1
    assert f"{bad}: tensor '{Q0}' has 3 non-finite values (3 NaN)" in _one_line_error(capsys)
    assert not out.exists()
    assert main([*argv, "--allow-nonfinite"]) == 0
    assert int(_read(out)[Q0].isnan().sum()) == 3


def test_inspect_still_shows_nonfinite_tensors(models, tmp_path, capsys):
    bad = _poisoned(models, "ft0", tmp_path)
    assert main(["inspect", bad]) == 0
    assert Q0 in capsys.readouterr().out
    assert main(["inspect", models["base"], bad]) == 0
    assert Q0 in capsys.readouterr().out


def _lora_adapter(path: Path, alpha=4.0, nan_in_b=False) -> str:
    """A PEFT LoRA folder (r=2) on the tiny model's layer-0 q_proj (8 x 8)."""
    path.mkdir()
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g)
    if nan_in_b:
        b[0, 0] = NAN
    weights = {f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b}
    save_file(weights, str(path / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": alpha, "target_modules": ["q_proj"]}
    (path / "adapter_config.json").write_text(json.dumps(cfg))  # NaN -> JSON's NaN
    return str(path)


def test_base_plus_adapter_with_nonfinite_alpha_or_weights(models, tmp_path, capsys):
    out = tmp_path / "merged"
    for alpha, nan_in_b, expected in [
        (NAN, False, "'lora_alpha' = nan must be a finite number"),
        (INF, False, "'lora_alpha' = inf must be a finite number"),
        (4.0, True, f"tensor '{Q0}' has 8 non-finite values (8 NaN)"),
    ]:
        adapter = _lora_adapter(tmp_path / f"ad{len(list(tmp_path.iterdir()))}", alpha, nan_in_b)
        ref = f"{models['base']}+{adapter}"
        recipe = {
            "method": "task_arithmetic",
            "base_model": models["base"],
            "models": [{"model": ref}, {"model": models["ft1"]}],
        }
        assert main(["merge", _recipe(tmp_path, recipe), "--out", str(out), "--quiet"]) == 1
        line = _one_line_error(capsys)
        assert expected in line and (adapter in line)
        assert not out.exists()
