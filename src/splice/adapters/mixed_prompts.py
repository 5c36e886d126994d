"""Prompt tuning and prefix tuning rows in a mixed-adapter batch (`splice.adapters.mixed_batch`):
each row gets its own adapter's virtual tokens, other rows get masked padding in their place.

With n_r the virtual tokens of row r's prompt-tuning adapter (0 for other rows), N = max n_r,
m_r / M the same for prefix tuning and T the input length, the call is rewritten as:

- ``inputs_embeds`` (B, N + T, d): row r = [0 … 0 (N − n_r) ; P_r (n_r) ; E[input_ids_r]],
  the virtual tokens right-aligned against the input (left padding, as HF batches prompts);
- ``past_key_values``: per layer keys / values (B, heads, M, head_dim), row r = [0 … 0 ;
  its prefix (m_r)] (a fresh ``DynamicCache``);
- ``attention_mask`` (B, M + N + T): 0 on every padding slot, 1 on the row's virtual tokens
  and prefix, then the given mask (ones when none is given);
- ``position_ids``: each row's positions as it has them alone — prompt rows 0 … n_r + T − 1
  over their virtual tokens and input (a given ``position_ids`` is dropped, as the adapter
  alone does); prefix rows the given positions (default 0 … T − 1) + m_r; other rows the given
  ones (default 0 … T − 1); padding slots 0 (masked). Explicit positions make absolute
  position embeddings (GPT-2) and rotary ones (the prefix keys carry no rotation) equal a row
  alone exactly; padding changes no unmasked score.
- ``labels``: −100 on the N virtual / padding positions.

The outputs cover the N + T input positions: row r's own outputs are its last n_r + T
positions (prompt tuning; what the adapter alone returns) or its last T (other rows). Masked
padding keys get the weight exp(−inf) = 0, so each row equals the row alone up to float
rounding (tested to 1e-5).

Generation (`prefill_call`, `generate_mixed`): the rewrite above is the prefill of a
left-padded batch, with positions taken from the whole rewritten mask instead
(``cumsum(mask) − 1``): each row's real slots — its prefix (m_r), its virtual tokens (n_r),
its input tokens (t_r) — are numbered as that row alone numbers them, so a left-padded row
(whose input tokens are not the last t columns of a fixed width) also equals the row alone:
prompt rows 0 … n_r − 1 then n_r …, prefix rows m_r … (the positions after the cache), others
0 …. The cache the prefill leaves holds M + N + T columns per row, of which row r uses
m_r + n_r + t_r; each later step feeds one token per row with the rewritten mask (its M + N
leading slots kept) extended by one column, at position (real slots so far), and runs the
model-level rows as base rows (prompt and prefix tuning act only through the prefill).

Limits (clear errors): model-level adapters only as a row's single name (not in a weighted
set); no ``past_key_values`` with content, ``token_type_ids`` or 4-D masks with them.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from splice.adapters.layer import AdapterStateError
from splice.adapters.methods._prompt_learning import (
    base_dtype,
    bind_call,
    cache_length,
    generate_with_prepare,
)
from splice.adapters.methods.prefix_tuning import PrefixEncoder, prefix_key_values
from splice.adapters.methods.prompt_tuning import PromptEmbedding

if TYPE_CHECKING:
    from splice.adapters.mixed_batch import MixedBatchPlan
    from splice.adapters.model import AdapterModel


def model_level_rows(am: AdapterModel, plan: MixedBatchPlan) -> dict[str, list[int]]:
    """Model-level adapter name → its rows (names only appear as single entries)."""
    out: dict[str, list[int]] = {}
    for seg in plan.segments:
        name = seg.weights[0][0]
        if seg.single and name in am.model_adapters:
            out.setdefault(name, []).extend(seg.rows)
    return out


def _check_call(kw: dict[str, Any]) -> None:
    if cache_length(kw.get("past_key_values")):
        raise AdapterStateError(
            "adapter_names with prompt / prefix tuning rows: past_key_values with content is "
            "not supported (the virtual tokens start a sequence)"
        )
    if kw.get("token_type_ids") is not None:
        raise AdapterStateError(
            "adapter_names with prompt / prefix tuning rows: token_type_ids are not supported"
        )
    mask = kw.get("attention_mask")
    if mask is not None and (not isinstance(mask, Tensor) or mask.dim() != 2):
        raise AdapterStateError(
            "adapter_names with prompt / prefix tuning rows needs a 2-D attention_mask"
        )
    if kw.get("input_ids") is None and kw.get("inputs_embeds") is None:
        raise AdapterStateError("the call has neither input_ids nor inputs_embeds")


def _padding_mask(lengths: Tensor, width: int, dtype: torch.dtype) -> Tensor:
    """(B, width): the last lengths[r] entries of row r are 1, the rest 0."""
    slots = torch.arange(width, device=lengths.device)
    return (slots[None, :] >= (width - lengths)[:, None]).to(dtype)


def prepare_mixed_call(
    am: AdapterModel, plan: MixedBatchPlan, args: tuple, kwargs: dict[str, Any]
) -> tuple[tuple, dict[str, Any]]:
    """The call's arguments with each row's virtual tokens (module docstring)."""
    rows = model_level_rows(am, plan)
    if not rows:
        return args, kwargs
    model = am.model
    kw = bind_call(model, args, kwargs)
    _check_call(kw)
    ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
    first = ids if ids is not None else embeds
    batch, length, device = first.shape[0], first.shape[1], first.device
    prompts = {n: r for n, r in rows.items() if isinstance(am.model_adapters[n], PromptEmbedding)}
    prefixes = {n: r for n, r in rows.items() if isinstance(am.model_adapters[n], PrefixEncoder)}
    n_prompt = torch.zeros(batch, dtype=torch.long, device=device)
    n_prefix = torch.zeros(batch, dtype=torch.long, device=device)
    for names, counts in ((prompts, n_prompt), (prefixes, n_prefix)):
        for name, r in names.items():
            counts[r] = am.model_adapters[name].num_virtual_tokens
    width_p, width_k = int(n_prompt.max()), int(n_prefix.max())

    mask = kw.get("attention_mask")
    if mask is None:
        mask = torch.ones(batch, length, dtype=torch.long, device=device)
    kw["attention_mask"] = torch.cat(
        [
            _padding_mask(n_prefix, width_k, mask.dtype),
            _padding_mask(n_prompt, width_p, mask.dtype),
            mask,
        ],
        dim=1,
    )

    given = kw.get("position_ids")
    token_pos = (
        torch.arange(length, device=device).expand(batch, -1)
        if given is None
        else given.expand(batch, -1)
    )
    is_prompt = n_prompt > 0
    # prompt rows: 0 … n + T − 1 over their virtual tokens and input (given positions dropped)
    token_pos = torch.where(
        is_prompt[:, None], torch.arange(length, device=device) + n_prompt[:, None], token_pos
    )
    token_pos = token_pos + n_prefix[:, None]
    virt = torch.arange(width_p, device=device)[None, :] - (width_p - n_prompt)[:, None]
    kw["position_ids"] = torch.cat([virt.clamp(min=0), token_pos], dim=1)

    if width_p:
        if embeds is None:
            embeds = model.get_input_embeddings()(ids)
        padded = embeds.new_zeros(batch, width_p + length, embeds.shape[-1])
        padded[:, width_p:] = embeds
        for name, r in prompts.items():
            p = am.model_adapters[name].prompt_embeddings.to(embeds.dtype)
            idx = torch.tensor(r, dtype=torch.long, device=device)
            padded[idx, width_p - p.shape[0] : width_p] = p
        kw["inputs_embeds"], kw["input_ids"] = padded, None
        labels = kw.get("labels")
        if labels is not None:
            pad = labels.new_full((batch, width_p), -100)
            kw["labels"] = torch.cat([pad, labels], dim=1)
    if width_k:
        kw["past_key_values"] = _prefix_cache(am, prefixes, batch, width_k, device)
    return (), kw


def _prefix_cache(
    am: AdapterModel, prefixes: dict[str, list[int]], batch: int, width: int, device: Any
) -> Any:
    """A DynamicCache whose row r holds row r's prefix right-aligned in ``width`` slots."""
    from transformers import DynamicCache

    dtype = base_dtype(am.model)
    layers: list[tuple[Tensor, Tensor]] | None = None
    for name, r in prefixes.items():
        enc = am.model_adapters[name]
        flat = enc.prefix().to(dtype).unsqueeze(0)
        kv = prefix_key_values(flat, enc.num_layers, enc.num_heads)
        if layers is None:
            layers = [
                tuple(t.new_zeros(batch, t.shape[1], width, t.shape[3]) for t in pair)
                for pair in kv
            ]
        idx = torch.tensor(r, dtype=torch.long, device=device)
        n = enc.num_virtual_tokens
        for (k_all, v_all), (k, v) in zip(layers, kv, strict=True):
            k_all[idx, :, width - n :] = k
            v_all[idx, :, width - n :] = v
    assert layers is not None
    return DynamicCache(layers)


def prefill_call(
    am: AdapterModel, plan: MixedBatchPlan, input_ids: Tensor, attention_mask: Tensor
) -> dict[str, Any]:
    """The forward keywords of the prefill of a left-padded batch with prompt / prefix rows
    (module docstring): ``inputs_embeds`` or ``input_ids``, the rewritten ``attention_mask``
    (M + N + T columns), ``position_ids`` (N + T columns, each row numbered as alone) and,
    with prefix rows, ``past_key_values`` (their prefixes)."""
    _, kw = prepare_mixed_call(
        am, plan, (), {"input_ids": input_ids, "attention_mask": attention_mask}
    )
    mask = kw["attention_mask"]
    first = kw["inputs_embeds"] if kw.get("inputs_embeds") is not None else kw["input_ids"]
    width = first.shape[1]
    kw["position_ids"] = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, mask.shape[1] - width :]
    return kw


def generate_mixed(am: AdapterModel, plan: MixedBatchPlan, args: tuple, kwargs: dict) -> Any:
    """``model.generate`` of a batch with prompt / prefix rows (module docstring): each step's
    inputs are rewritten in ``prepare_inputs_for_generation`` — the first step by
    `prefill_call` (its prefix cache replaces the empty one ``generate`` made; HF takes the
    cache back from the outputs), later steps get the newest token only, the M + N leading
    mask slots and their own positions. ``plan`` has one row per decoded row."""
    model = am.model
    base_prepare = model.prepare_inputs_for_generation
    full_mask: list[Tensor] = []  # the rewritten mask so far (M + N + T + steps columns)

    @functools.wraps(base_prepare)
    def prepare(*a: Any, **k: Any) -> dict[str, Any]:
        step = base_prepare(*a, **k)
        cache_key = "cache" if "cache" in step else "past_key_values"
        ids = step.get("input_ids")
        if ids is None:
            raise AdapterStateError(
                "generate() with prompt / prefix tuning rows needs input_ids (not inputs_embeds)"
            )
        step.pop("cache_position", None)
        if not full_mask:
            if cache_length(step.get(cache_key)):
                raise AdapterStateError(
                    "generate() with prompt / prefix tuning rows: past_key_values with content "
                    "is not supported"
                )
            mask = step.get("attention_mask")
            if mask is None:
                mask = torch.ones_like(ids)
            kw = prefill_call(am, plan, ids, mask)
            full_mask.append(kw["attention_mask"])
            prefix = kw.pop("past_key_values", None)
            if prefix is not None:
                step[cache_key] = prefix
            step.update(kw)
            return step
        # one new token per row (HF generate without assistants): extend the mask by one
        full = full_mask[0]
        full = torch.cat([full, torch.ones_like(full[:, :1])], dim=1)
        full_mask[0] = full
        step["input_ids"] = ids[:, -1:]
        step["attention_mask"] = full
        step["position_ids"] = (full.sum(dim=1, keepdim=True) - 1).clamp(min=0)
        return step

    return generate_with_prepare(model, prepare, args, kwargs)
