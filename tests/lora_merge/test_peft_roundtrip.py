"""Merged adapters load in PEFT and hold the expected deltas; parity with add_weighted_adapter."""

import json
import warnings

import pytest
import torch
from lora_test_util import base_weights, load_peft, make_adapter, merged_weights, tiny_llama
from safetensors.torch import load_file, save_file

from splice.errors import CheckpointError, MergeValidationError
from splice.lora_merge import merge_low_rank_recipe
from splice.peft import read_lora_adapters
from splice.recipe.schema import parse_recipe

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    a1 = make_adapter(root / "a1", seed=1)
    # different rank, an rsLoRA scale and a rank/alpha pattern for v_proj
    a2 = make_adapter(
        root / "a2",
        seed=2,
        r=2,
        lora_alpha=4,
        use_rslora=True,
        rank_pattern={"v_proj": 3},
        alpha_pattern={"v_proj": 6},
    )
    return a1, a2


def merge_adapters(adapter_dirs, method, out, weights=None, **params):
    """`splice lora merge` as a library call: the recipe of lora:METHOD over the adapters."""
    weights = weights or [1.0] * len(adapter_dirs)
    models = [{"model": str(a), "parameters": {"weight": w}} for a, w in zip(adapter_dirs, weights)]
    recipe = {"method": f"lora:{method}", "models": models, "parameters": params}
    return merge_low_rank_recipe(parse_recipe(recipe), out)


def _expected(adapter_dirs, weights):
    """base + Σ w_i s_i B_i A_i, from the factors as PEFT reads them (delta in compute layout)."""
    want = base_weights()
    for ad, w in zip(read_lora_adapters(adapter_dirs), weights):
        for module, f in ad.modules.items():
            want[module + ".weight"] = want[module + ".weight"] + w * f.to_dense()
    return want


def _assert_weights(got, want, atol=1e-6):
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=atol, rtol=0, msg=k)


def test_concat_loads_in_peft_with_exact_delta(adapters, tmp_path):
    weights = [0.7, -1.3]
    out = tmp_path / "cat"
    report = merge_adapters(list(adapters), "concat", out, weights=weights)
    cfg = json.loads((out / "adapter_config.json").read_text())
    # rank Σ r_i: 4 + 2 for q/down, 4 + 3 for v (through rank_pattern)
    assert set(report.ranks.values()) == {6, 7}
    assert cfg["r"] == 6 and cfg["lora_alpha"] == 6 and not cfg["use_rslora"]
    assert set(cfg["rank_pattern"].values()) == {7} and cfg["alpha_pattern"] == cfg["rank_pattern"]
    _assert_weights(merged_weights(out), _expected(adapters, weights))
    # PEFT's forward pass equals a model holding the expected weights
    ids = torch.tensor([[1, 5, 9, 3]])
    ref = tiny_llama()
    ref.load_state_dict(_expected(adapters, weights))
    with torch.no_grad():
        torch.testing.assert_close(load_peft(out)(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)


def test_svd_and_knots_load_in_peft(adapters, tmp_path):
    for method, params in (("svd", {"rank": 3}), ("knots", {})):
        out = tmp_path / method
        report = merge_adapters(list(adapters), method, out, **params)
        written = read_lora_adapters([out])[0]
        want = base_weights()
        for module, f in written.modules.items():
            assert f.rank == report.ranks[module]
            want[module + ".weight"] = want[module + ".weight"] + f.to_dense()
        _assert_weights(merged_weights(out), want)


def _peft_weighted(adapter_dirs, weights, combination, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(tiny_llama(), adapter_dirs[0], adapter_name="a")
        pm.load_adapter(adapter_dirs[1], adapter_name="b")
        pm.add_weighted_adapter(["a", "b"], weights, "m", combination_type=combination, **kw)
    deltas = {}
    for name, mod in pm.named_modules():
        if hasattr(mod, "lora_A") and "m" in mod.lora_A:
            key = name.removeprefix("base_model.model.")
            deltas[key] = mod.get_delta_weight("m").detach()
    return deltas


@pytest.mark.parametrize(
    "combination,method,params",
    [("cat", "concat", {}), ("svd", "svd", {"rank": 3})],
)
def test_parity_with_peft_add_weighted_adapter(adapters, tmp_path, combination, method, params):
    weights = [0.7, -1.3]
    kw = {"svd_rank": 3} if combination == "svd" else {}
    peer = _peft_weighted(list(adapters), weights, combination, **kw)
    out = merge_adapters(list(adapters), method, tmp_path / method, weights=weights, **params)
    ours = read_lora_adapters([out.out_dir])[0]
    assert set(peer) == set(ours.modules)
    for module, delta in peer.items():
        torch.testing.assert_close(ours.modules[module].to_dense(), delta, atol=2e-6, rtol=0)


def test_bad_inputs(adapters, tmp_path):
    a1, _ = adapters
    other = make_adapter(tmp_path / "o", seed=3, target_modules=["q_proj"])
    with pytest.raises(MergeValidationError, match="adapt different modules"):
        merge_adapters([a1, other], "concat", tmp_path / "x")
    # a different base: v_proj with another output size
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((a1 / "adapter_config.json").read_text())
    t = load_file(a1 / "adapter_model.safetensors")
    for k in list(t):
        if "layers.0.self_attn.v_proj.lora_B" in k:
            t[k] = torch.zeros(8, 4)
    save_file(t, bad / "adapter_model.safetensors")
    with pytest.raises(MergeValidationError, match="different bases"):
        merge_adapters([a1, bad], "concat", tmp_path / "y")
    mts = make_adapter(tmp_path / "mts", seed=4, modules_to_save=["lm_head"])
    with pytest.raises(MergeValidationError, match="modules_to_save"):
        merge_adapters([a1, mts], "concat", tmp_path / "z")
    (tmp_path / "taken").mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        merge_adapters([a1, a1], "concat", tmp_path / "taken")
    with pytest.raises(MergeValidationError, match="needs parameter 'density'"):
        merge_adapters([a1, a1], "dare", tmp_path / "w")
    assert not (tmp_path / "w").exists() and not (tmp_path / "x").exists()
