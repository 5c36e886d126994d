"""Retrieval of adapters by embedding similarity (LoraRetriever / MOS style).

    library = AdapterLibrary.load(["lora/news", "lora/spam", "lora/tweets"])
    retriever = Retriever(library, embedder, k=2, temperature=0.1)
    sets = retriever.route(texts)          # [{"news": 0.73, "tweets": 0.27}, ...] per text
    load_library(am, library)              # the adapters into an AdapterModel, by name
    am(input_ids, adapter_names=sets)      # each row with its own weighted set

For a query x with unit embedding q = e(x) (`splice.compose.embedding`) and adapter i's
centroid c_i (`splice.compose.library`),

    sim_i = cos(q, c_i) = q·c_i / (‖q‖ ‖c_i‖),
    T     = the k adapters of largest sim (ties: the earlier adapter in the library),
    w_i   = exp(sim_i / τ) / Σ_{j∈T} exp(sim_j / τ)   for i ∈ T, 0 otherwise.

The weights sum to 1; as τ → ∞ they tend to LoraRetriever's uniform 1/k mixture, as τ → 0
to the single nearest adapter. Defaults: k = 2, τ = 0.1 (cosine similarities differ by
tenths, so τ = 1 would be almost uniform).

Applying the sets (default: the mixed-adapter forward, `splice.adapters.mixed_batch`): every
row runs its own set, y = f(x) + Σ_i w_i (f_i(x) − f(x)) at each adapted layer, which for
weight-space adapters is exactly the layer with W + Σ_i w_i ΔW_i (the "merge on the fly" /
LoraRetriever's fusion of updates) without forming any ΔW; rows of one batch may choose
different adapters. The sets are plain ``adapter_names`` entries, so ``am.generate(...,
adapter_names=sets)`` generates with them too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from splice.adapters import AdapterModel, load_adapter
from splice.compose.embedding import MeanPoolEmbedder
from splice.compose.library import AdapterLibrary, RetrievalError
from splice.errors import SpliceError

DEFAULT_K = 2
DEFAULT_TEMPERATURE = 0.1


def cosine_similarities(queries: Tensor, centroids: Tensor) -> Tensor:
    """(n, m) cosines between the rows of ``queries`` (n, d) and ``centroids`` (m, d)."""
    if queries.shape[-1] != centroids.shape[-1]:
        raise RetrievalError(
            f"query embeddings have dimension {queries.shape[-1]}, centroids "
            f"{centroids.shape[-1]}; use the embedder the centroids were computed with"
        )
    q = nn.functional.normalize(queries.float(), dim=-1)
    c = nn.functional.normalize(centroids.float(), dim=-1)
    return q @ c.T


def top_k_softmax(sims: Tensor, k: int, temperature: float) -> tuple[Tensor, Tensor]:
    """(indices, weights), each (n, k'), k' = min(k, m): per row the k largest similarities
    in descending order (ties: the lower index first) and softmax(sim / temperature) over them."""
    if k < 1:
        raise RetrievalError(f"k must be at least 1 (got {k})")
    if not (math.isfinite(temperature) and temperature > 0):
        raise RetrievalError(f"the temperature must be positive and finite (got {temperature})")
    order = torch.sort(sims, dim=-1, descending=True, stable=True)
    k = min(k, sims.shape[-1])
    top, values = order.indices[..., :k], order.values[..., :k]
    return top, torch.softmax(values.double() / temperature, dim=-1).to(sims.dtype)


class Retriever:
    """Chooses a weighted set of library adapters per text (module docstring)."""

    def __init__(
        self,
        library: AdapterLibrary,
        embedder: MeanPoolEmbedder,
        *,
        k: int = DEFAULT_K,
        temperature: float = DEFAULT_TEMPERATURE,
    ) -> None:
        top_k_softmax(torch.zeros(1, 1), k, temperature)  # checks k and the temperature
        library.check_embedder(embedder.embedder_id, embedder.dim)
        self.library, self.embedder, self.k, self.temperature = library, embedder, k, temperature
        self.centroids = library.matrix()

    def similarities(self, texts: Sequence[str]) -> Tensor:
        """(len(texts), adapters) cosine similarities."""
        return cosine_similarities(self.embedder.embed(texts), self.centroids)

    def route(self, texts: Sequence[str]) -> list[dict[str, float]]:
        """One weighted set {adapter name: weight} per text, in descending weight."""
        return sets_from_scores(
            self.similarities(texts), self.library.names, self.k, self.temperature
        )


def sets_from_scores(
    sims: Tensor, names: Sequence[str], k: int, temperature: float
) -> list[dict[str, float]]:
    """The weighted set of each row of ``sims`` (n, len(names))."""
    top, weights = top_k_softmax(sims, k, temperature)
    return [
        {names[int(i)]: float(w) for i, w in zip(row_i, row_w, strict=True)}
        for row_i, row_w in zip(top, weights, strict=True)
    ]


def load_library(am: AdapterModel, library: AdapterLibrary) -> None:
    """Load every library adapter into ``am`` under its library name (those already there by
    that name are kept). An adapter that does not fit the model (trained for another base) is
    a RetrievalError naming it; the adapters loaded by this call are removed again."""
    added: list[str] = []
    try:
        for entry in library.entries:
            if entry.name in am.configs:
                continue
            try:
                load_adapter(am, entry.path, entry.name, activate=False)
            except SpliceError as e:
                raise RetrievalError(
                    f"library adapter '{entry.name}' does not fit this model: {e}"
                ) from None
            added.append(entry.name)
    except BaseException:
        for name in added:
            am.delete_adapter(name)
        raise


def retrieve_forward(
    am: AdapterModel, retriever: Retriever, texts: Sequence[str], **model_inputs: Any
) -> Any:
    """``am(**model_inputs)`` with row r running the set retrieved for ``texts[r]`` (the
    library's adapters must be loaded: `load_library`)."""
    return am(**model_inputs, adapter_names=retriever.route(texts))
