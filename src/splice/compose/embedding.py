"""Sentence embeddings for adapter retrieval: the mean-pooled last hidden state, L2-normalised.

For a text tokenised to t_1..t_T (padding excluded by the attention mask) with last-layer
hidden states h_1..h_T,

    e = m / ‖m‖,      m = (1/T) Σ_t h_t,

the pooling all-MiniLM-L6-v2 was trained with (sentence-transformers: mean pooling, then
normalisation). The default embedder of splice's retrieval is that packaged MiniLM (an encoder
made for this; ``splice.train.models.resolve_model("minilm")`` finds it offline); any HF model
folder works, including the base model itself: given an `AdapterModel`, the embedder runs it
with its adapters disabled (`AdapterModel.disabled`), so a query's embedding does not depend
on which adapters happen to be active.

``embedder_id`` names the embedder in the centroid files (`splice.compose.library`): a packaged
name ("minilm"), a folder path, or ``base:<path>``; centroids and queries must come from the
same embedder, which the library checks by this id and the dimension.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from splice.adapters import AdapterModel
from splice.errors import SpliceError


class EmbedderError(SpliceError):
    pass


class MeanPoolEmbedder:
    """``embed(texts)``: one unit vector per text (module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        embedder_id: str,
        *,
        max_length: int = 256,
        batch_size: int = 32,
    ) -> None:
        if max_length < 1 or batch_size < 1:
            raise EmbedderError("max_length and batch_size must be at least 1")
        self.model, self.tokenizer, self.embedder_id = model, tokenizer, embedder_id
        self.max_length, self.batch_size = max_length, batch_size
        if getattr(tokenizer, "pad_token", None) is None and hasattr(tokenizer, "eos_token"):
            tokenizer.pad_token = tokenizer.eos_token

    @classmethod
    def from_folder(
        cls, folder: str | os.PathLike[str], embedder_id: str | None = None, **kw: Any
    ) -> MeanPoolEmbedder:
        """An HF model folder's base model (``AutoModel``: no head) and tokenizer."""
        from transformers import AutoModel, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
        return cls(model, tokenizer, embedder_id or str(folder), **kw)

    @property
    def dim(self) -> int:
        config = getattr(self.model, "config", None)
        size = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
        if size is None:
            return int(self.embed(["a"]).shape[1])
        return int(size)

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> Tensor:
        """(len(texts), dim) float32 unit vectors, on the CPU."""
        if not texts:
            raise EmbedderError("nothing to embed: no texts")
        if isinstance(self.model, AdapterModel):
            with self.model.disabled():
                return self._embed(texts)
        return self._embed(texts)

    def _embed(self, texts: Sequence[str]) -> Tensor:
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = list(texts[start : start + self.batch_size])
            enc = self.tokenizer(
                batch,
                truncation=True,
                max_length=self.max_length,
                padding=True,
                return_tensors="pt",
            )
            mask = enc["attention_mask"].to(device)
            inputs = {k: v.to(device) for k, v in enc.items() if k in _MODEL_INPUTS}
            hidden = self.model(**inputs, output_hidden_states=True).hidden_states[-1]
            out.append(mean_pool(hidden.float(), mask).cpu())
        return torch.cat(out)


_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Σ_t mask_t h_t / Σ_t mask_t per row, then L2-normalised (a zero vector stays zero)."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    summed = (hidden * weights).sum(dim=1)
    counts = weights.sum(dim=1).clamp_min(1.0)
    return nn.functional.normalize(summed / counts, dim=-1)
