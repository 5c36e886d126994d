"""LoRA initialisations (PEFT's ``init_lora_weights``) and the PiSSA/OLoRA → LoRA conversion.

With W the base weight (out×in, float32), r the rank and s the scaling:

- ``True`` (default): A ~ kaiming_uniform(a=√5) (nn.Linear's init), B = 0, so ΔW = 0 at
  init; embeddings: A = 0, B ~ N(0, 1) (PEFT, after loralib).
- ``"gaussian"``: A ~ N(0, (1/r)²), B = 0 (PEFT: std = 1/r); embeddings as ``True``.
- ``False``: A and B random (nn.Linear's / torch.randn init; for tests).
- ``"pissa"`` (Meng et al. 2024): W = U S Vᵀ, the top-r part taken into the adapter:
  A = diag(√(S_r/s)) V_rᵀ, B = U_r diag(√(S_r/s)), so s · B A = U_r S_r V_rᵀ, and the base
  becomes W_res = W − s · B A; the adapted model equals the base at init.
  ``"pissa_niter_K"``: the same from ``torch.svd_lowrank(W, r, niter=K)`` (randomised, fast).
- ``"olora"`` (Büyükakyüz 2024): W = Q R (QR decomposition); A = R[:r], B = Q[:, :r],
  W_res = W − s · B A.
(PEFT's exact formulas, `peft/tuners/lora/layer.py` pissa_init / olora_init; GPT-2 Conv1D
weights are transposed to out×in first and back after.)

PiSSA and OLoRA change the base weights, so an adapter trained from them needs W_res. Saving:
``save_adapter`` writes the adapter as is with ``init_lora_weights`` in its config: PEFT and
splice, loading it onto the *original* base, rerun the (deterministic, for "pissa" and
"olora") initialisation and so rebuild W_res before loading A and B. `save_as_lora` instead
writes PEFT's converted form (``save_pretrained(path_initial_model_for_weight_conversion=)``):
ΔW = s(B A − B₀ A₀) = s · [B | −B₀] [A ; A₀], a plain LoRA of rank 2r with lora_alpha 2α
(√2·α with rsLoRA) and ``init_lora_weights=True``, which applies to the original base as any
LoRA does (and stacks with other adapters). A₀, B₀ are kept (not saved) for that.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from splice.adapters.config import AdapterConfigError
from splice.io.output_folder import OutputFolder
from splice.peft.files import saved_key


def pissa_factors(
    w: Tensor, r: int, scaling: float, niter: int | None = None
) -> tuple[Tensor, Tensor]:
    """(A, B) with s · B A the top-r SVD part of ``w`` (out×in, float32)."""
    if niter is None:
        u, s_vals, vh = torch.linalg.svd(w, full_matrices=False)
        ur, sr, vhr = u[:, :r], s_vals[:r] / scaling, vh[:r]
    else:
        ur, sr, v = torch.svd_lowrank(w, r, niter=niter)
        sr, vhr = sr / scaling, v.t()
    root = torch.sqrt(sr)
    return torch.diag(root) @ vhr, ur @ torch.diag(root)


def olora_factors(w: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """(A, B) = (R[:r], Q[:, :r]) of the QR decomposition of ``w`` (out×in, float32)."""
    q, rr = torch.linalg.qr(w)
    return rr[:r].contiguous(), q[:, :r].contiguous()


def niter_of(init: str) -> int | None:
    """K of "pissa_niter_K", None for "pissa"; AdapterConfigError otherwise."""
    if init == "pissa":
        return None
    head, sep, tail = init.partition("_niter_")
    if head == "pissa" and sep and tail.isdigit():
        return int(tail)
    raise AdapterConfigError(
        f"init_lora_weights={init!r}: use True, False, 'gaussian', 'pissa', "
        "'pissa_niter_<K>' or 'olora'"
    )


@torch.no_grad()
def initialise(module: Any, base: nn.Module, init: bool | str, r: int) -> None:
    """Apply ``init`` to a LoraLinear / LoraConv2d / LoraEmbedding (see the module docstring)."""
    from splice.adapters.methods.lora_layers import LoraEmbedding, LoraLinear

    if init is False:
        return
    if isinstance(module, LoraEmbedding):
        nn.init.zeros_(module.lora_embedding_A)
        nn.init.normal_(module.lora_embedding_B)
        return
    if init in (True, "gaussian"):
        if init == "gaussian":
            nn.init.normal_(module.lora_A.weight, std=1 / r)
        else:
            nn.init.kaiming_uniform_(module.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(module.lora_B.weight)
        if module.lora_B.bias is not None:
            nn.init.zeros_(module.lora_B.bias)
        return
    assert isinstance(module, LoraLinear) and isinstance(init, str)
    dtype = base.weight.dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise AdapterConfigError(f"{init} initialisation needs a float base weight, got {dtype}")
    w = module.base_weight(base).float()
    s = module.scaling
    if init == "olora":
        a, b = olora_factors(w, r)
    else:
        a, b = pissa_factors(w, r, s, niter_of(init))
    module.lora_A.weight.copy_(a)
    module.lora_B.weight.copy_(b)
    module.register_buffer("lora_A_init", a.clone(), persistent=False)
    module.register_buffer("lora_B_init", b.clone(), persistent=False)
    w_res = (w - s * (b @ a)).to(dtype)
    base.weight.copy_(w_res.T if module.transpose else w_res)


def converted_lora(am: Any, name: str) -> tuple[Any, dict[str, Tensor]]:
    """(config, tensors) of adapter ``name`` (PiSSA / OLoRA) as a plain rank-2r LoRA on the
    original base: A' = [A ; A₀], B' = [B | −B₀], lora_alpha doubled (√2· with rsLoRA)."""
    from splice.adapters.peft_format import adapter_state

    config = am.configs.get(name)
    if config is None:
        am._check(name)
    if config.use_dora:
        raise AdapterConfigError(f"adapter '{name}': DoRA adapters cannot be converted to LoRA")
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise AdapterConfigError(
            f"adapter '{name}': rsLoRA with rank/alpha patterns cannot be converted (as PEFT)"
        )
    state = adapter_state(am, name)
    for path, module in am.named_adapter_modules(name):
        a0 = getattr(module, "lora_A_init", None)
        if a0 is None:
            raise AdapterConfigError(
                f"adapter '{name}': module '{path}' has no PiSSA/OLoRA initial factors (it was "
                "not initialised with init_lora_weights='pissa'/'olora' in this session)"
            )
        a_key, b_key = saved_key(path, "lora_A.weight"), saved_key(path, "lora_B.weight")
        a, b = state[a_key].detach(), state[b_key].detach()
        state[a_key] = torch.cat([a, a0.to(a.dtype)], dim=0)
        state[b_key] = torch.cat([b, -module.lora_B_init.to(b.dtype)], dim=1)
    alpha = config.lora_alpha * (math.sqrt(2) if config.use_rslora else 2)
    new = config.model_copy(
        update={
            "r": config.r * 2,
            "lora_alpha": alpha,
            "init_lora_weights": True,
            "rank_pattern": {k: 2 * v for k, v in config.rank_pattern.items()},
            "alpha_pattern": {k: 2 * v for k, v in config.alpha_pattern.items()},
        }
    )
    return new, state


def save_as_lora(
    am: Any,
    out_dir: str | os.PathLike[str],
    name: str = "default",
    *,
    overwrite: int | bool = False,
) -> Path:
    """Write adapter ``name`` (PiSSA / OLoRA) as the equivalent plain LoRA of rank 2r for
    the *original* base (PEFT's ``path_initial_model_for_weight_conversion`` output)."""
    from splice.adapters.peft_format import save_adapter_files

    saved = converted_lora(am, name)
    with OutputFolder(out_dir, overwrite=overwrite).check() as tmp:
        save_adapter_files(am, tmp, name, saved=saved)
    return Path(out_dir)
