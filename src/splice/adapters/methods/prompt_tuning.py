"""Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt
Tuning").

A trainable matrix P (num_virtual_tokens × d, d the model's embedding size) is put in front of
the input embeddings; the model is frozen:

    inputs_embeds = [P ; E[input_ids]]            (batch, n + T, d)
    attention_mask = [1 … 1 ; attention_mask]     labels = [-100 … -100 ; labels]

The output logits cover all n + T positions (the first n belong to the virtual tokens), as
PEFT 0.21 returns them; the loss ignores the virtual positions (label -100). Position ids are
the model's own over the longer sequence (given ``position_ids`` are dropped, as PEFT does).

Init (``prompt_tuning_init``, PEFT's options and draws, so the same seed gives PEFT's P):
- "RANDOM": nn.Embedding's default, P ~ N(0, 1) (PEFT's choice; the paper samples from
  the embedding range or from vocabulary, PEFT's SAMPLE_VOCAB / TEXT below);
- "SAMPLE_VOCAB": rows of the word embedding at ``randint(0, vocab)`` token ids;
- "TEXT": rows of the word embedding at the ids of ``prompt_tuning_init_text`` tokenized by
  ``AutoTokenizer.from_pretrained(tokenizer_name_or_path, **tokenizer_kwargs)`` (special
  tokens included, ``trust_remote_code`` removed), repeated and cut to n tokens.
An adapter loaded from a folder skips the init (no tokenizer needed), as PEFT's inference
mode does. P is kept in float32 and cast to the embeddings' dtype in the forward.

Saved key: ``prompt_embeddings`` (n × d), PEFT's name.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
from pydantic import model_validator
from torch import Tensor, nn

from splice.adapters.config import AdapterConfigError
from splice.adapters.layer import AdapterStateError, copy_saved
from splice.adapters.methods._prompt_learning import (
    Kwargs,
    PromptLearningAdapter,
    PromptLearningConfig,
    check_causal_lm,
    model_dims,
)
from splice.adapters.registry import adapter_method


class PromptTuningConfig(PromptLearningConfig):
    prompt_tuning_init: Literal["RANDOM", "TEXT", "SAMPLE_VOCAB"] = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict[str, Any] | None = None

    peft_inert_defaults: ClassVar[dict[str, Any]] = {}

    @model_validator(mode="after")
    def _check(self) -> PromptTuningConfig:
        self.check_common()
        if self.prompt_tuning_init == "TEXT":
            if not self.tokenizer_name_or_path:
                raise AdapterConfigError(
                    "'prompt_tuning': prompt_tuning_init='TEXT' needs tokenizer_name_or_path"
                )
            if not self.prompt_tuning_init_text:
                raise AdapterConfigError(
                    "'prompt_tuning': prompt_tuning_init='TEXT' needs prompt_tuning_init_text"
                )
        elif self.tokenizer_kwargs:
            raise AdapterConfigError(
                "'prompt_tuning': tokenizer_kwargs only apply with prompt_tuning_init='TEXT'"
            )
        return self

    def resolved(self, model: nn.Module) -> PromptTuningConfig:
        dims = model_dims(check_causal_lm(model, self.method))
        width = model.get_input_embeddings().weight.shape[1]
        token_dim = self.token_dim if self.token_dim is not None else dims["hidden"]
        if token_dim != width:
            raise AdapterConfigError(
                f"'prompt_tuning': token_dim={token_dim}, but the model's embeddings are "
                f"{width} wide"
            )
        update = {
            "token_dim": token_dim,
            "num_transformer_submodules": 1,
            "num_layers": self.num_layers if self.num_layers is not None else dims["num_layers"],
            "num_attention_heads": (
                self.num_attention_heads if self.num_attention_heads is not None else dims["heads"]
            ),
        }
        out = self.model_copy(update=update)
        out._from_saved = self._from_saved
        return out


def text_init_ids(tokenizer_ids: list[int], n: int) -> list[int]:
    """PEFT's TEXT init ids: the text's token ids cut to n, or repeated ⌈n/len⌉ times and cut."""
    if not tokenizer_ids:
        raise AdapterConfigError("'prompt_tuning': prompt_tuning_init_text has no tokens")
    reps = math.ceil(n / len(tokenizer_ids))
    return (list(tokenizer_ids) * reps)[:n]


def _tokenize(config: PromptTuningConfig) -> list[int]:
    from transformers import AutoTokenizer

    kwargs = dict(config.tokenizer_kwargs or {})
    kwargs.pop("trust_remote_code", None)  # never run code shipped with a tokenizer
    try:
        tok = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
    except Exception as e:  # any failure to load is a config problem here
        raise AdapterConfigError(
            f"'prompt_tuning': cannot load tokenizer {config.tokenizer_name_or_path!r}: "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
    return list(tok(config.prompt_tuning_init_text)["input_ids"])


class PromptEmbedding(PromptLearningAdapter):
    """P in front of the input embeddings (see the module docstring)."""

    def __init__(self, num_virtual_tokens: int, token_dim: int) -> None:
        super().__init__(num_virtual_tokens)
        # the same draw as PEFT's nn.Embedding(n, d): normal_(0, 1)
        self.prompt_embeddings = nn.Parameter(
            nn.init.normal_(torch.empty(num_virtual_tokens, token_dim))
        )

    @torch.no_grad()
    def init_from_vocab(self, word_embeddings: nn.Module, ids: list[int] | Tensor) -> None:
        ids = torch.as_tensor(ids, dtype=torch.long, device=word_embeddings.weight.device)
        self.prompt_embeddings.data = word_embeddings(ids).detach().clone().float()

    def inject(self, model: nn.Module, kw: Kwargs, batch: int) -> None:
        embeds = kw.get("inputs_embeds")
        if embeds is None:
            embeds = model.get_input_embeddings()(kw["input_ids"])
        prompts = self.prompt_embeddings.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        kw["inputs_embeds"] = torch.cat([prompts, embeds], dim=1)
        kw["input_ids"] = None
        labels = kw.get("labels")
        if labels is not None:
            pad = torch.full(
                (batch, self.num_virtual_tokens), -100, dtype=labels.dtype, device=labels.device
            )
            kw["labels"] = torch.cat([pad, labels], dim=1)

    def peft_state(self) -> dict[str, Tensor]:
        return {"prompt_embeddings": self.prompt_embeddings}

    def load_peft_state(self, state: dict[str, Tensor], where: str) -> None:
        if set(state) != {"prompt_embeddings"}:
            raise AdapterStateError(
                f"{where}: expected the one tensor 'prompt_embeddings', got {sorted(state)[:4]}"
            )
        copy_saved(
            [(f"{where}.prompt_embeddings", self.prompt_embeddings, state["prompt_embeddings"])]
        )


@adapter_method(PromptTuningConfig, name="prompt_tuning", peft_type="PROMPT_TUNING", kind="model")
def build_prompt_tuning(model: nn.Module, config: PromptTuningConfig) -> PromptEmbedding:
    config = config.resolved(model)
    n, d = config.num_virtual_tokens, config.token_dim
    assert n is not None and d is not None
    word_embeddings = model.get_input_embeddings()
    ids: list[int] | Tensor | None = None
    if not config._from_saved and config.prompt_tuning_init == "TEXT":
        ids = text_init_ids(_tokenize(config), n)  # before any draw: a bad tokenizer fails fast
    module = PromptEmbedding(n, d)
    if not config._from_saved and config.prompt_tuning_init == "SAMPLE_VOCAB":
        # drawn after P's own (discarded) init: PEFT's order of draws
        ids = torch.randint(0, word_embeddings.num_embeddings, (n,), dtype=torch.long)
    if ids is not None:
        module.init_from_vocab(word_embeddings, ids)
    return module.to(device=word_embeddings.weight.device)
