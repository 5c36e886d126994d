"""LoRA+ (Hayou et al. 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models"):
train B with a larger learning rate than A, η_B = ratio · η_A (the paper suggests ratio ≈ 16).

`loraplus_param_groups` returns torch optimizer parameter groups with PEFT's grouping
(`peft/optimizers/loraplus.py`, ``create_loraplus_optimizer``), over the trainable parameters:

- "embedding": the factors of LoRA on an nn.Embedding, at ``embedding_lr`` (PEFT's
  ``loraplus_lr_embedding``, default 1e-6);
- "B": ``lora_B`` weights and every 1-D parameter (DoRA magnitudes, trained biases, a saved
  head's bias) at lr · ratio, with ``weight_decay`` except biases and LayerNorm parameters
  (then 0, group "B_no_decay");
- "A": everything else (``lora_A``, full copies' weights) at lr with ``weight_decay``.

    groups = loraplus_param_groups(am, lr=1e-4, ratio=16)
    opt = torch.optim.AdamW(groups)
"""

from __future__ import annotations

from typing import Any

from torch import nn

from splice.adapters.methods.lora_layers import LoraEmbedding


def loraplus_param_groups(
    adapter_model: nn.Module,
    lr: float,
    ratio: float = 16.0,
    weight_decay: float = 0.0,
    embedding_lr: float = 1e-6,
) -> list[dict[str, Any]]:
    """Optimizer groups [A, embedding, B, B_no_decay] (PEFT's order); each has "name",
    "params", "lr" and "weight_decay". Parameters that do not require grad are skipped."""
    groups: dict[str, list[nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    seen: set[int] = set()
    for module_name, module in adapter_model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            name = f"{module_name}.{pname}" if module_name else pname
            if isinstance(module, LoraEmbedding) and pname.startswith("lora_embedding_"):
                groups["embedding"].append(p)
            elif "lora_B" in name or p.ndim == 1:
                no_decay = "bias" in name or isinstance(module, nn.LayerNorm)
                groups["B_no_decay" if no_decay else "B"].append(p)
            else:
                groups["A"].append(p)
    return [
        {"name": "A", "params": groups["A"], "lr": lr, "weight_decay": weight_decay},
        {
            "name": "embedding",
            "params": groups["embedding"],
            "lr": embedding_lr,
            "weight_decay": weight_decay,
        },
        {"name": "B", "params": groups["B"], "lr": lr * ratio, "weight_decay": weight_decay},
        {
            "name": "B_no_decay",
            "params": groups["B_no_decay"],
            "lr": lr * ratio,
            "weight_decay": 0.0,
        },
    ]
