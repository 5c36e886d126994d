"""What prompt tuning and prefix tuning share: the config fields PEFT gives every "prompt
learning" method, the model checks and dimensions, and the rewriting of a Hugging Face causal
LM's ``forward`` / ``generate`` call (PEFT 0.21's ``PeftModelForCausalLM``, which splice
follows so that logits compare 1:1):

- the 2-D ``attention_mask`` gets ``num_virtual_tokens`` ones in front (the virtual tokens are
  always attended to); a padded mask keeps its zeros after them;
- ``position_ids``: prefix tuning shifts given positions by ``num_virtual_tokens`` (the prefix
  sits in the cache at positions 0..n-1); prompt tuning drops them (the model numbers the
  longer sequence itself), as PEFT does; ``token_type_ids`` are dropped;
- the method's ``inject`` adds the virtual tokens (prompt embeddings in front of the input
  embeddings, or a key/value cache) when the call starts a sequence, i.e. when no cache or an
  empty one is passed. A non-empty cache is taken to hold the virtual tokens already (it came
  from an earlier adapted call, e.g. one decoding step after another): only the mask is
  extended. PEFT's forward re-injects in that case (a second prefix); splice does not.

Only decoder-only causal LMs are supported (``...ForCausalLM``, GPT-2's ``...LMHeadModel``).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, ClassVar

import torch
from pydantic import PrivateAttr
from torch import Tensor, nn

from splice.adapters.config import AdapterConfig, AdapterConfigError
from splice.adapters.layer import AdapterStateError
from splice.adapters.model_adapter import ModelAdapter

Kwargs = dict[str, Any]


class PromptLearningConfig(AdapterConfig):
    """Fields of PEFT's ``PromptLearningConfig``. The model dimensions default to None and are
    filled from the model's config when the adapter is added (PEFT's
    ``_prepare_prompt_learning_config``); the saved adapter_config.json holds the filled
    values, as PEFT's does."""

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None

    # Set by `from_peft`: the config comes with saved weights, so no init that needs outside
    # files (a tokenizer) runs, as PEFT skips init in inference mode.
    _from_saved: bool = PrivateAttr(default=False)

    def check_common(self) -> None:
        m = self.method
        if self.num_virtual_tokens is None or self.num_virtual_tokens < 1:
            raise AdapterConfigError(
                f"'{m}': num_virtual_tokens must be a positive integer, got "
                f"{self.num_virtual_tokens!r}"
            )
        for k in ("token_dim", "num_attention_heads", "num_layers"):
            v = getattr(self, k)
            if v is not None and v < 1:
                raise AdapterConfigError(f"'{m}': {k} must be positive, got {v}")
        if self.num_transformer_submodules not in (None, 1):
            raise AdapterConfigError(
                f"'{m}': num_transformer_submodules={self.num_transformer_submodules}: only "
                "decoder-only models (1) are supported"
            )
        if self.target_modules is not None or self.exclude_modules is not None:
            raise AdapterConfigError(
                f"'{m}' acts on the model's inputs: target_modules / exclude_modules do not apply"
            )
        if self.modules_to_save:
            raise AdapterConfigError(f"'{m}': modules_to_save is not supported (causal LMs only)")

    def to_peft(self) -> dict[str, Any]:
        out = super().to_peft()
        for k in ("target_modules", "exclude_modules"):  # not fields of PEFT's prompt configs
            out.pop(k, None)
        return out

    @classmethod
    def from_peft(cls, data: dict[str, Any], where: str = "adapter_config.json") -> AdapterConfig:
        config = super().from_peft(data, where)
        config._from_saved = True
        return config

    def for_targets(self, model: Any, targets: list[tuple[str, Any]]) -> AdapterConfig:
        return self.resolved(model)

    def resolved(self, model: nn.Module) -> PromptLearningConfig:
        """A copy with the model dimensions filled in (and checked against ``model``)."""
        raise NotImplementedError


def check_causal_lm(model: nn.Module, method: str) -> Any:
    """The model's (text) config; a clear error unless ``model`` is a HF decoder-only LM."""
    config = getattr(model, "config", None)
    names = [type(model).__name__, *(getattr(config, "architectures", None) or [])]
    is_lm = any(n.endswith(("ForCausalLM", "LMHeadModel")) for n in names)
    if config is None or not is_lm or getattr(config, "is_encoder_decoder", False):
        raise AdapterConfigError(
            f"'{method}' supports Hugging Face decoder-only causal LMs (…ForCausalLM); "
            f"got a {type(model).__name__}"
        )
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return config


def model_dims(config: Any) -> dict[str, Any]:
    """(layers, hidden size, attention heads) and, when the config names them, the key/value
    heads and head size, read as PEFT reads them."""
    raw = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))

    def first(*keys: str) -> Any:
        for k in keys:
            v = getattr(config, k, None)
            if v is None:
                v = raw.get(k)
            if v is not None:
                return v
        return None

    return {
        "num_layers": first("num_hidden_layers", "num_layers", "n_layer"),
        "hidden": first("hidden_size", "n_embd", "d_model"),
        "heads": first("num_attention_heads", "n_head", "num_heads"),
        "kv_heads": raw.get("num_key_value_heads"),
        "head_dim": raw.get("head_dim"),
    }


def bind_call(model: nn.Module, args: tuple[Any, ...], kwargs: Kwargs) -> Kwargs:
    """The forward call as keyword arguments only (positional ones named by the signature)."""
    if not args:
        return dict(kwargs)
    params = [
        p.name
        for p in inspect.signature(model.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(args) > len(params):
        raise AdapterStateError(
            f"{type(model).__name__}.forward takes {len(params)} positional arguments, "
            f"got {len(args)}"
        )
    out = dict(kwargs)
    for name, value in zip(params, args, strict=False):
        if name in out:
            raise AdapterStateError(f"forward got '{name}' both by position and by name")
        out[name] = value
    return out


def cache_length(cache: Any) -> int:
    """Tokens already in a past_key_values cache (0 for None)."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    raise AdapterStateError(
        "past_key_values must be a transformers Cache (e.g. DynamicCache), not "
        f"{type(cache).__name__}"
    )


class PromptLearningAdapter(ModelAdapter):
    """A model-level adapter that adds ``num_virtual_tokens`` virtual tokens to each sequence.
    Subclasses implement ``inject(model, kwargs, batch)`` and set ``drops_position_ids``."""

    drops_position_ids: ClassVar[bool] = True

    def __init__(self, num_virtual_tokens: int) -> None:
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens

    def inject(self, model: nn.Module, kw: Kwargs, batch: int) -> None:
        raise NotImplementedError

    # -- forward ------------------------------------------------------------------------------

    def prepare(
        self, model: nn.Module, args: tuple[Any, ...], kwargs: Kwargs
    ) -> tuple[tuple[Any, ...], Kwargs]:
        kw = bind_call(model, args, kwargs)
        self._rewrite(model, kw)
        return (), kw

    def _rewrite(self, model: nn.Module, kw: Kwargs) -> bool:
        """Rewrite the call ``kw`` in place; True when the virtual tokens were injected."""
        ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        if ids is None and embeds is None:
            raise AdapterStateError("the call has neither input_ids nor inputs_embeds")
        batch = (ids if ids is not None else embeds).shape[0]
        mask = kw.get("attention_mask")
        if mask is not None:
            if not isinstance(mask, Tensor) or mask.dim() != 2:
                raise AdapterStateError(
                    "prompt/prefix tuning needs a 2-D attention_mask (batch, length); "
                    "4-D masks and static caches are not supported"
                )
            ones = torch.ones(batch, self.num_virtual_tokens, dtype=mask.dtype, device=mask.device)
            kw["attention_mask"] = torch.cat([ones, mask], dim=1)
        if kw.get("position_ids") is not None:
            if self.drops_position_ids:
                kw["position_ids"] = None
            else:
                kw["position_ids"] = kw["position_ids"] + self.num_virtual_tokens
        if kw.get("token_type_ids") is not None:
            kw["token_type_ids"] = None
        if cache_length(kw.get("past_key_values")) == 0:
            self.inject(model, kw, batch)
            return True
        return False

    # -- generation ---------------------------------------------------------------------------

    def generate(self, model: nn.Module, args: tuple[Any, ...], kwargs: Kwargs) -> Any:
        """``model.generate`` with each step's inputs rewritten (PEFT's
        ``prepare_inputs_for_generation``): the virtual tokens enter at the first step, later
        steps extend the mask over them."""
        base_prepare = model.prepare_inputs_for_generation

        @functools.wraps(base_prepare)
        def prepare(*a: Any, **k: Any) -> Kwargs:
            step = base_prepare(*a, **k)
            # transformers >= 5 names the generation cache `cache`; older ones past_key_values
            cache_key = "cache" if "cache" in step else "past_key_values"
            ids = step.get("input_ids")
            seen = cache_length(step.get(cache_key))
            if seen and ids is not None and seen >= ids.shape[1]:
                step["input_ids"] = ids[:, -1:]  # PEFT: only the newest token after the cache
            if cache_key == "cache":
                # `_rewrite` reads and (prefix tuning) writes past_key_values
                step["past_key_values"] = step.pop("cache")
            injected = self._rewrite(model, step)
            if cache_key == "cache":
                step["cache"] = step.pop("past_key_values")
            if step.get("cache_position") is not None:  # older transformers only
                if self.drops_position_ids:
                    step.pop("cache_position")
                elif injected:
                    step["cache_position"] = step["cache_position"] + self.num_virtual_tokens
            return step

        return generate_with_prepare(model, prepare, args, kwargs)


def base_dtype(model: nn.Module) -> torch.dtype:
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return model.get_input_embeddings().weight.dtype


def generate_with_prepare(
    model: nn.Module, prepare: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """``model.generate(*args, **kwargs)`` with ``prepare`` as the model's
    ``prepare_inputs_for_generation`` for this call only (the model's own attribute, or the
    class method, is restored afterwards, also on error)."""
    base_prepare = model.prepare_inputs_for_generation
    had_own = "prepare_inputs_for_generation" in vars(model)
    model.prepare_inputs_for_generation = prepare
    try:
        return model.generate(*args, **kwargs)
    finally:
        if had_own:
            model.prepare_inputs_for_generation = base_prepare
        else:
            del model.prepare_inputs_for_generation
