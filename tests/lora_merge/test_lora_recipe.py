"""`splice merge RECIPE` over PEFT LoRA adapter folders: a LoRA out when the method has a
low-rank form, adapters folded into the base when they sit next to checkpoints."""

import pytest
import torch
import yaml
from lora_test_util import (
    base_weights,
    load_peft,
    make_adapter,
    merged_weights,
    save_base,
    tiny_llama,
)
from safetensors.torch import load_file

from splice.cli import main
from splice.errors import MergeValidationError
from splice.lora_merge import route
from splice.peft import read_lora_adapters
from splice.recipe.schema import parse_recipe


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    root = tmp_path_factory.mktemp("three")
    base = save_base(root / "base")
    return str(base), [str(make_adapter(root / f"a{i}", seed=10 + i, r=8)) for i in range(3)]


def _run(tmp_path, recipe: dict, out_name: str, capsys) -> tuple[int, str]:
    path = tmp_path / f"{out_name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code = main(["merge", str(path), "--out", str(tmp_path / out_name), "--quiet"])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _tensors(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def test_svd_recipe_of_three_adapters_is_a_peft_adapter_equal_to_lora_merge(
    three, tmp_path, capsys
):
    """The issue's acceptance test: three adapters, `svd` to rank 16, a folder PEFT loads,
    its ΔW equal to `splice lora merge`'s (bit for bit)."""
    _, adapters = three
    models = [{"model": a, "parameters": {"weight": w}} for a, w in zip(adapters, [1, 0.5, -0.7])]
    recipe = {"method": "svd", "models": models, "parameters": {"rank": 16}}
    code, said = _run(tmp_path, recipe, "recipe_out", capsys)
    assert code == 0 and "a PEFT LoRA adapter (ranks: 16)" in said, said
    argv = ["lora", "merge", *adapters, "--method", "svd", "--rank", "16"]
    assert main([*argv, "--weights", "1,0.5,-0.7", "--out", str(tmp_path / "alias")]) == 0
    ours, alias = _tensors(tmp_path / "recipe_out"), _tensors(tmp_path / "alias")
    assert set(ours) == set(alias)
    for k in ours:
        assert torch.equal(ours[k], alias[k]), k
    # PEFT loads it, and its merged weights are base + the rank-16 truncation of Σ w_i ΔW_i
    written = read_lora_adapters([tmp_path / "recipe_out"])[0]
    assert {f.rank for f in written.modules.values()} == {16}
    want = base_weights()
    inputs = read_lora_adapters(adapters)
    for module, f in written.modules.items():
        full = sum(w * ad.modules[module].to_dense() for ad, w in zip(inputs, [1, 0.5, -0.7]))
        u, s, vh = torch.linalg.svd(full.double())
        truncated = ((u[:, :16] * s[:16]) @ vh[:16]).float()
        torch.testing.assert_close(f.to_dense(), truncated, atol=1e-5, rtol=1e-5)
        want[module + ".weight"] = want[module + ".weight"] + f.to_dense()
    got = merged_weights(tmp_path / "recipe_out")
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0, msg=k)
    assert load_peft(tmp_path / "recipe_out") is not None


def test_same_name_resolved_by_the_inputs(three, tmp_path, capsys):
    """`ties` over adapters is the low-rank ties (a LoRA out, equal to `lora merge`); over
    BASE+ADAPTER references the dense ties (a checkpoint out)."""
    base, adapters = three
    params = {"density": 0.5, "rank": 8}
    code, said = _run(
        tmp_path,
        {"method": "ties", "models": [{"model": a} for a in adapters], "parameters": params},
        "low",
        capsys,
    )
    assert code == 0 and "PEFT LoRA adapter" in said
    argv = ["lora", "merge", *adapters, "--method", "ties", "--density", "0.5", "--rank", "8"]
    assert main([*argv, "--out", str(tmp_path / "alias")]) == 0
    low, alias = _tensors(tmp_path / "low"), _tensors(tmp_path / "alias")
    assert all(torch.equal(low[k], alias[k]) for k in alias)
    folded = {
        "method": "ties",
        "base_model": base,
        "parameters": {"density": 0.5},
        "models": [{"model": f"{base}+{a}"} for a in adapters],
    }
    code, said = _run(tmp_path, folded, "dense", capsys)
    assert code == 0 and "a dense checkpoint" in said and "folded" not in said
    assert (tmp_path / "dense" / "model.safetensors").is_file()


def test_a_lora_next_to_a_full_fine_tune_is_folded(three, tmp_path, capsys):
    """Mixed inputs: the bare adapter becomes BASE+ADAPTER; the output equals the recipe
    written that way by hand, and the CLI says the output is dense and what was folded."""
    base, adapters = three
    full = tmp_path / "ft"
    model = tiny_llama()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    model.save_pretrained(full)
    mixed = {
        "method": "task_arithmetic",
        "base_model": base,
        "models": [{"model": adapters[0]}, {"model": str(full)}],
    }
    code, said = _run(tmp_path, mixed, "mixed", capsys)
    assert code == 0, said
    assert f"a dense checkpoint; LoRA adapters folded into the base: {adapters[0]}" in said
    by_hand = {**mixed, "models": [{"model": f"{base}+{adapters[0]}"}, {"model": str(full)}]}
    assert _run(tmp_path, by_hand, "by_hand", capsys)[0] == 0
    got = load_file(str(tmp_path / "mixed" / "model.safetensors"))
    want = load_file(str(tmp_path / "by_hand" / "model.safetensors"))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_routing_rules_and_errors(three, tmp_path):
    base, adapters = three
    models = [{"model": a} for a in adapters]

    def routed(**recipe):
        return route(parse_recipe(recipe))

    assert routed(method="svd", models=models).representation == "low_rank"
    assert routed(method="lora:ties", models=models).representation == "low_rank"
    # a method without a low-rank form over adapters: folded into the base
    r = routed(method="linear", base_model=base, models=models)
    assert r.representation == "dense" and r.folded == adapters
    assert [e.model for e in r.recipe.models] == [f"{base}+{a}" for a in adapters]
    with pytest.raises(MergeValidationError, match="needs a base_model"):
        routed(method="linear", models=models)
    with pytest.raises(MergeValidationError, match="merges PEFT LoRA adapter folders only"):
        routed(method="svd", models=[{"model": base}])
    with pytest.raises(MergeValidationError, match="merges PEFT LoRA adapter folders only"):
        routed(method="lora:ties", base_model=base, models=[*models, {"model": base}])
    with pytest.raises(MergeValidationError, match=r"merge method .nope.; available: concat"):
        routed(method="lora:nope", models=models)
    # a plain checkpoint recipe is untouched
    plain = routed(method="linear", models=[{"model": base}, {"model": base}])
    assert plain.representation == "dense" and not plain.folded


@pytest.mark.parametrize(
    "recipe_extra, match",
    [
        ({"parameters": {"rank": [4, 8]}}, "layer gradient"),
        ({"parameters": {"density": 0.5}}, "'lora:svd' has no parameter 'density'"),
        ({"parameters": {"rank": 0}}, "greater than or equal to 1"),
        ({"lines": {"alpha": 1.0, "beta": 0.5}}, "'lines' applies to checkpoint merges"),
    ],
)
def test_low_rank_recipe_errors_before_any_output(three, tmp_path, capsys, recipe_extra, match):
    _, adapters = three
    recipe = {"method": "svd", "models": [{"model": a} for a in adapters], **recipe_extra}
    code, said = _run(tmp_path, recipe, "out", capsys)
    assert code == 1 and match in said and not (tmp_path / "out").exists()


def test_filters_give_modules_their_own_values(three, tmp_path, capsys):
    """{filter, value} settings match `<module>.weight`, as the dense tensor's name."""
    _, adapters = three
    weight = [{"filter": "q_proj", "value": 2.0}, {"value": 0.0}]
    models = [{"model": adapters[0], "parameters": {"weight": weight}}, {"model": adapters[1]}]
    code, said = _run(tmp_path, {"method": "concat", "models": models}, "f", capsys)
    assert code == 0, said
    out = read_lora_adapters([tmp_path / "f"])[0].modules
    a0, a1 = (ad.modules for ad in read_lora_adapters(adapters[:2]))
    for module, f in out.items():
        w0 = 2.0 if module.endswith("q_proj") else 0.0
        want = w0 * a0[module].to_dense() + a1[module].to_dense()
        torch.testing.assert_close(f.to_dense(), want, atol=1e-6, rtol=0)


def test_resume_is_refused_for_a_lora_output(three, tmp_path, capsys):
    _, adapters = three
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"method": "concat", "models": [{"model": adapters[0]}]}))
    assert main(["merge", str(path), "--out", str(tmp_path / "o"), "--resume"]) == 1
    assert "--resume applies to checkpoint merges" in capsys.readouterr().err


def test_methods_lists_both_representations(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    dense, low = out.split("Low-rank (LoRA-native) methods")
    low, compression = low.split("Compression methods")
    assert "- `tall`: TALL masks" in compression
    assert "- `ties`: Trim each task vector" in dense and "lora:" not in dense
    assert "- `lora:ties`: TIES on the dense ΔW_i" in low and "- `lora:svd`" in low
    assert "| `svd` | no | ≥1 | `weight` | model | float | `1.0` |" in low
    assert main(["lora", "methods"]) == 0
    assert capsys.readouterr().out.strip() == "Low-rank (LoRA-native) methods" + low.rstrip()


def test_tensor_prefix_is_refused_for_lora_adapters(three, tmp_path, capsys):
    base, adapters = three
    models = [{"model": a, "tensor_prefix": "model."} for a in adapters[:2]]
    recipe = {"method": "lora:ties", "base_model": base, "models": models}
    code, said = _run(tmp_path, recipe, "out", capsys)
    assert code == 1, said
    assert "'models[0].tensor_prefix' applies to checkpoint merges" in said, said
    assert not (tmp_path / "out").exists()
