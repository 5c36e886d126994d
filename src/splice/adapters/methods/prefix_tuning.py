"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for
Generation").

Every attention layer l gets n = num_virtual_tokens trainable key and value vectors per
key/value head, put in front of the keys and values it computes from the input:

    K_l = [Pk_l ; W_k h],   V_l = [Pv_l ; W_v h],   attention over n + T positions

so a query attends to the prefix as to n earlier tokens. Splice follows PEFT 0.21 exactly:

- One flat vector per virtual token, F: n × (L · 2 · D) with D = token_dim; per token it holds
  (layer 0 key, layer 0 value, layer 1 key, …), each D = heads × head_dim wide, heads major:
  F.view(n, 2L, heads, head_dim) → key of layer l = F[:, 2l], value = F[:, 2l + 1], laid out
  (batch, heads, n, head_dim) in a transformers ``DynamicCache`` passed as ``past_key_values``.
  The prefix keys get no rotary embedding (they enter the cache as they are, as in PEFT).
- Only models whose layers all use full attention (Llama, Mistral, Qwen2, GPT-2, ...): PEFT's
  special cache handling of sliding-window / shared-KV layers (Gemma 2-4) is not reproduced,
  so such models are a clear error.
- Grouped-query attention (Llama): PEFT sizes the prefix to the key/value heads:
  token_dim = head_dim × num_key_value_heads, num_attention_heads = num_key_value_heads.
- Reparameterization (the paper's MLP, ``prefix_projection=True``):
  F = W2 tanh(W1 E + b1) + b2 with E: n × D (embedding), W1: D → encoder_hidden_size
  (default token_dim), W2: encoder_hidden_size → 2 L D. Without it F is the parameter itself.
- Init: nn.Embedding / nn.Linear defaults (PEFT's draws, same order); ``init_weights="zero"``
  zeroes F (or W2 and b2), so the prefix keys and values start at 0.
- The attention mask gets n ones in front; the input's positions start at n (the model counts
  the cached prefix), and given ``position_ids`` are shifted by n, as PEFT does.
- Saved key ``prompt_embeddings`` = F (n × 2 L D), PEFT's name. With the MLP this is its
  output (the MLP is not saved, as in PEFT): an adapter loaded from a folder holds F itself.
  F is kept in float32 and cast to the model's dtype in the forward.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import model_validator
from torch import Tensor, nn

from splice.adapters.config import AdapterConfigError
from splice.adapters.layer import AdapterStateError, copy_saved
from splice.adapters.methods._prompt_learning import (
    Kwargs,
    PromptLearningAdapter,
    PromptLearningConfig,
    base_dtype,
    check_causal_lm,
    model_dims,
)
from splice.adapters.registry import adapter_method


class PrefixTuningConfig(PromptLearningConfig):
    init_weights: Literal["zero"] | None = None
    encoder_hidden_size: int | None = None
    prefix_projection: bool = False

    @model_validator(mode="after")
    def _check(self) -> PrefixTuningConfig:
        self.check_common()
        if self.encoder_hidden_size is not None and self.encoder_hidden_size < 1:
            raise AdapterConfigError(
                f"'prefix_tuning': encoder_hidden_size must be positive, got "
                f"{self.encoder_hidden_size}"
            )
        return self

    def resolved(self, model: nn.Module) -> PrefixTuningConfig:
        text_config = check_causal_lm(model, self.method)
        layer_types = set(getattr(text_config, "layer_types", None) or ["full_attention"])
        if layer_types != {"full_attention"} or getattr(text_config, "num_kv_shared_layers", 0):
            raise AdapterConfigError(
                f"'prefix_tuning': layers of kinds {sorted(layer_types)} (sliding-window or "
                "shared key/value layers) are not supported; full-attention models only"
            )
        dims = model_dims(text_config)
        num_layers = self.num_layers if self.num_layers is not None else dims["num_layers"]
        token_dim = self.token_dim if self.token_dim is not None else dims["hidden"]
        heads = self.num_attention_heads if self.num_attention_heads is not None else dims["heads"]
        if None in (num_layers, token_dim, heads):
            raise AdapterConfigError(
                "'prefix_tuning': cannot read num_layers / token_dim / num_attention_heads from "
                "the model's config: set them"
            )
        if dims["kv_heads"] is not None:  # PEFT: the prefix is sized to the key/value heads
            head_dim = dims["head_dim"] if dims["head_dim"] is not None else token_dim // heads
            token_dim, heads = head_dim * dims["kv_heads"], dims["kv_heads"]
        # the shapes the model's attention expects in its cache
        kv = dims["kv_heads"] or dims["heads"]
        hd = dims["head_dim"] or dims["hidden"] // dims["heads"]
        if (num_layers, heads, token_dim) != (dims["num_layers"], kv, kv * hd):
            raise AdapterConfigError(
                f"'prefix_tuning': num_layers={num_layers}, num_attention_heads={heads}, "
                f"token_dim={token_dim} do not fit the model ({dims['num_layers']} layers, "
                f"{kv} key/value heads of size {hd})"
            )
        update = {
            "num_layers": num_layers,
            "token_dim": token_dim,
            "num_attention_heads": heads,
            "num_transformer_submodules": 1,
            "encoder_hidden_size": self.encoder_hidden_size or token_dim,
        }
        out = self.model_copy(update=update)
        out._from_saved = self._from_saved
        return out


def prefix_key_values(flat: Tensor, num_layers: int, num_heads: int) -> list[tuple[Tensor, Tensor]]:
    """Per layer (key, value), each (batch, heads, n, head_dim), from the flat prefix
    ``flat``: (batch, n, num_layers · 2 · heads · head_dim) (PEFT's layout, module docstring)."""
    b, n, width = flat.shape
    if width % (2 * num_layers * num_heads):
        raise AdapterStateError(
            f"prefix width {width} is not 2 × {num_layers} layers × {num_heads} heads × head_dim"
        )
    x = flat.view(b, n, 2 * num_layers, num_heads, -1).permute(2, 0, 3, 1, 4)
    return [(x[2 * i], x[2 * i + 1]) for i in range(num_layers)]


class PrefixEncoder(PromptLearningAdapter):
    """The prefix F, as a parameter or as the MLP's output (see the module docstring)."""

    drops_position_ids = False

    def __init__(
        self,
        num_virtual_tokens: int,
        token_dim: int,
        num_layers: int,
        num_heads: int,
        encoder_hidden_size: int,
        projection: bool,
        zero_init: bool,
    ) -> None:
        super().__init__(num_virtual_tokens)
        self.num_layers, self.num_heads = num_layers, num_heads
        self.projection = projection
        width = num_layers * 2 * token_dim
        if projection:  # PEFT's modules and order of draws
            self.embedding = nn.Embedding(num_virtual_tokens, token_dim)
            self.transform = nn.Sequential(
                nn.Linear(token_dim, encoder_hidden_size),
                nn.Tanh(),
                nn.Linear(encoder_hidden_size, width),
            )
            if zero_init:
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, width)
            if zero_init:
                nn.init.zeros_(self.embedding.weight)

    def prefix(self) -> Tensor:
        """F: n × (L · 2 · token_dim), float32."""
        if self.projection:
            return self.transform(self.embedding.weight)
        return self.embedding.weight

    def inject(self, model: nn.Module, kw: Kwargs, batch: int) -> None:
        from transformers import DynamicCache

        flat = self.prefix().to(base_dtype(model)).unsqueeze(0).repeat(batch, 1, 1)
        layers = prefix_key_values(flat, self.num_layers, self.num_heads)
        kw["past_key_values"] = DynamicCache(layers)

    def peft_state(self) -> dict[str, Tensor]:
        return {"prompt_embeddings": self.prefix().detach() if self.projection else self.prefix()}

    def load_peft_state(self, state: dict[str, Tensor], where: str) -> None:
        if set(state) != {"prompt_embeddings"}:
            raise AdapterStateError(
                f"{where}: expected the one tensor 'prompt_embeddings', got {sorted(state)[:4]}"
            )
        if self.projection:
            raise AdapterStateError(
                f"{where}: a saved prefix is the MLP's output; it cannot be loaded into the MLP "
                "(load the folder with load_adapter, which keeps the prefix itself)"
            )
        copy_saved(
            [(f"{where}.prompt_embeddings", self.embedding.weight, state["prompt_embeddings"])]
        )


@adapter_method(PrefixTuningConfig, name="prefix_tuning", peft_type="PREFIX_TUNING", kind="model")
def build_prefix_tuning(model: nn.Module, config: PrefixTuningConfig) -> PrefixEncoder:
    config = config.resolved(model)
    args: dict[str, Any] = dict(
        num_virtual_tokens=config.num_virtual_tokens,
        token_dim=config.token_dim,
        num_layers=config.num_layers,
        num_heads=config.num_attention_heads,
        encoder_hidden_size=config.encoder_hidden_size,
        # a loaded adapter holds F itself, as PEFT's inference mode does
        projection=config.prefix_projection and not config._from_saved,
        zero_init=config.init_weights == "zero",
    )
    module = PrefixEncoder(**args)
    return module.to(device=model.get_input_embeddings().weight.device)
