"""A PEFT LoRA adapter as a recipe input (`BASE+ADAPTER`): the merge sees PEFT's folded model."""

import warnings

import pytest
import torch

from splice.engine import plan_merge, run_merge
from splice.recipe.schema import parse_recipe
from splice.reference import open_checkpoint
from tiny_hf import tiny_llama

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def test_task_arithmetic_over_a_lora_adapter_equals_peft_merge(tmp_path):
    model = tiny_llama(0)
    model.save_pretrained(tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(
            model,
            peft.LoraConfig(
                r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "down_proj"]
            ),
        )
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
        pm.save_pretrained(tmp_path / "adapter")
        merged = pm.merge_and_unload().state_dict()
    base, ad = str(tmp_path / "base"), str(tmp_path / "adapter")
    recipe = parse_recipe(
        {
            "method": "task_arithmetic",
            "base_model": base,
            "models": [{"model": f"{base}+{ad}"}],
            "parameters": {"lambda": 0.5},
        }
    )
    plan = plan_merge(recipe)
    try:
        run_merge(plan, tmp_path / "out", progress=False)
    finally:
        plan.close()
    out = open_checkpoint(str(tmp_path / "out"))
    b = open_checkpoint(base)
    changed = 0
    for name in out.names():
        want = b.read(name) + 0.5 * (merged[name] - b.read(name))
        torch.testing.assert_close(out.read(name), want, rtol=0, atol=1e-6)
        changed += not torch.equal(out.read(name), b.read(name))
    assert changed == 4  # q_proj and down_proj of both layers
    assert (tmp_path / "out" / "config.json").is_file()
