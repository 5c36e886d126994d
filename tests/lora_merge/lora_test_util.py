"""Tiny models and trained-looking PEFT LoRA adapters for the lora_merge tests."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

import tiny_hf

peft = __import__("peft")
transformers = __import__("transformers")


def tiny_llama(seed: int = 0):
    return tiny_hf.tiny_llama(seed).eval()


def save_base(path: Path) -> Path:
    tiny_llama().save_pretrained(path)
    return path


def make_adapter(path: Path, seed: int, **lora_kwargs) -> Path:
    """A LoRA adapter on tiny_llama() with random (non-zero) A and B, saved to `path`."""
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    kwargs.update(lora_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**kwargs))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        pm.save_pretrained(path)
    return path


def load_peft(adapter: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(tiny_llama(), adapter).eval()


def merged_weights(adapter: Path) -> dict[str, torch.Tensor]:
    """PEFT's own merge_and_unload() of tiny_llama() + adapter."""
    model = load_peft(adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def base_weights() -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in tiny_llama().state_dict().items()}
