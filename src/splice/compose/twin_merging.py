"""Twin-Merging (Lu et al., NeurIPS 2024, "Twin-Merging: Dynamic Integration of Modular
Expertise in Model Merging"; official code LZY-the-boys/Twin-Merging, ``discriminative/``).

    twin = TwinMerging.build(model, shared_state, exclusive)   # model: θ* + LoRA adapters
    twin.router = train_router(embeddings, task_ids, n_tasks)  # on a little validation data
    out = twin(batch)            # each row its own Σ_t w_t τ̂_t, in one mixed-adapter forward

With T fine-tuned experts θ_1..θ_T of one base:

- **shared knowledge** θ* = a merge of the experts (the paper: Task Arithmetic, λ = 0.29 on
  its 8 GLUE tasks; any splice merge here, chosen by the caller);
- **exclusive knowledge** of task t, per weight matrix: τ_t = θ_t − θ*, compressed by a
  truncated SVD, τ̂_t = U_k diag(S_k) V_kᵀ with k = ⌊min(m, n) · fraction⌋ or a fixed rank
  (the official ``sparsify.svd``: ``new_rank = int(density · len(S))``, default density
  0.1, i.e. ``mask_rate`` 0.9); 1-D tensors are kept whole (``sparsify.svd`` returns them
  unchanged); `exclusive_knowledge`, through TSV-C's `splice.compress.tsv.compress_delta`;
- **router**: w(x) = softmax(R(e(x))) ∈ Δ^T, e(x) the mean-pooled last hidden state of the
  *shared* model (official ``router.py``: ``AutoModel`` of the shared expert, mean over the
  tokens), R the official ``SimpleMLP``: Linear(d, 2d) → BatchNorm → LeakyReLU → Dropout(0.5)
  → Linear(2d, 2d) → BatchNorm → LeakyReLU → Dropout(0.5) → Linear(2d, T), trained with
  cross-entropy to predict the task id (AdamW, lr 5e-4, batch 1024, 50 epochs, linear decay:
  its ``transformers.Trainer`` settings); `TwinRouter`, `train_router`;
- **inference**: the model of input x is θ(x) = θ* + Σ_t w_t(x) τ̂_t (`twin_state`, the
  paper's per-input merge, materialized).

splice runs θ(x) without materializing a model per input: θ* is the model's weight and each
τ̂_t = B_t A_t (B_t = U_k diag(S_k), A_t = V_kᵀ) a LoRA adapter ``twin<i>`` of scaling 1 on
that Linear layer, and a batch runs one mixed-adapter forward
``am(..., adapter_names=[{twin0: w_0(x_r), ...} per row r])`` (`splice.adapters.mixed_batch`),
which at every adapted layer computes y = W* x + Σ_t w_t B_t A_t x = (W* + Σ_t w_t τ̂_t) x,
the same linear layer as the merged one (a test checks the two against each other).

Choices and differences from the paper's code:

- Only the weight matrices of Linear layers carry exclusive knowledge (they are what a LoRA
  adapter can hold per row); every other tensor (biases, LayerNorm, embeddings) is the shared
  model's. The official code keeps 1-D twin vectors (LayerNorm weights) uncompressed and
  takes biases and the classifier from the *true task's* fine-tuned model (``--exclude-param
  .*classifier.* .*bias.*``, then ``functional_call`` on that task's model), which leaks the
  task id into every bias. `exclusive_knowledge` / `twin_state` implement the paper's form on
  whole state dicts (1-D tensors kept whole) for reference; `TwinMerging.build` reports what
  it could not carry (``uncovered``).
- ``features="layers"`` (not the paper's; off by default) gives the router every hidden
  state instead of the last one: e(x) = [m_0(x); m_1(x); ...; m_L(x)], m_l the
  mean-pooled, L2-normalised output of layer l (m_0: the embeddings), and the router's
  hidden width is 2 · the model's width (`router_hidden`) instead of 2 · dim(e). The last
  layer of a sentence encoder keeps what a text is about and loses how it is written:
  on the eight-task MiniLM pool (LoRA experts) the last-layer router sends 91.2% of test
  examples to their own task's expert, every layer 96.1% (noun vs verb glosses 87 / 89 →
  95.5 / 97.0%). `splice.bench.twin` measures it.
- The router's embedding is splice's `mean_pool` (masked mean, then L2-normalised; the
  official one is an unnormalised mean over unpadded single examples: the BatchNorm after
  the first layer absorbs most of the scale). Its training data is the caller's (the paper
  says a small validation set; the official script embeds up to 5,500 examples per task of
  GLUE's training split and keeps the epoch best on the test split, which splice does not:
  it trains ``epochs`` and stops). ``top_k`` (off by default, as the paper) keeps the k
  largest weights, renormalized (`splice.compose.gate.route`).
- A row whose weights are all zero runs the shared model alone (``__base__``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from splice.adapters import AdapterModel
from splice.adapters.mixed_batch import BASE_NAME
from splice.adapters.targeting import is_linear, named_base_modules
from splice.compose.embedding import mean_pool
from splice.compose.gate import route
from splice.compress.tsv import compress_delta
from splice.delta import Dense, LowRank
from splice.errors import SpliceError

RouterFeatures = Literal["last", "layers"]  # the last hidden state (the paper's), or all
DEFAULT_FRACTION = 0.1  # the official density (1 - mask_rate 0.9) of the singular values
ADAPTER_PREFIX = "twin"
# the official router's Trainer settings (router.py ``train_router``)
ROUTER_EPOCHS = 50
ROUTER_LR = 5e-4
ROUTER_BATCH = 1024
ROUTER_DROPOUT = 0.5

State = Mapping[str, Tensor]
Exclusive = dict[str, LowRank | Dense]


class TwinMergingError(SpliceError):
    pass


def exclusive_knowledge(
    shared: State,
    expert: State,
    *,
    rank: int | None = None,
    fraction: float | None = None,
    names: Sequence[str] | None = None,
) -> Exclusive:
    """τ̂ = SVD_k(θ_t − θ*) per 2-D tensor (``LowRank(U_k diag(S_k), V_kᵀ)``), the difference
    itself (``Dense``) for other tensors; over ``names`` (default: every tensor of
    ``shared``). k from ``rank`` or ``fraction`` (default `DEFAULT_FRACTION`) of min(m, n),
    clamped to [1, min(m, n)] (`splice.compress.tsv.kept_rank`)."""
    if rank is None and fraction is None:
        fraction = DEFAULT_FRACTION
    out: Exclusive = {}
    for n in shared if names is None else names:
        if n not in shared or n not in expert:
            where = "the shared model" if n not in shared else "the expert"
            raise TwinMergingError(f"tensor '{n}' is missing from {where}")
        if shared[n].shape != expert[n].shape:
            raise TwinMergingError(
                f"tensor '{n}': shape {list(expert[n].shape)} in the expert, "
                f"{list(shared[n].shape)} in the shared model"
            )
        delta = expert[n].float() - shared[n].float()
        out[n] = compress_delta(delta, rank=rank, fraction=fraction)
    return out


def twin_state(
    shared: State, exclusive: Sequence[Mapping[str, LowRank | Dense]], weights: Sequence[float]
) -> dict[str, Tensor]:
    """θ = θ* + Σ_t w_t τ̂_t (the paper's per-input model), in each shared tensor's dtype."""
    if len(exclusive) != len(weights):
        raise TwinMergingError(f"{len(weights)} weight(s) for {len(exclusive)} task(s)")
    out = {}
    for n, s in shared.items():
        acc = s.float().clone()
        for w, ex in zip(weights, exclusive, strict=True):
            if n in ex and float(w) != 0.0:
                acc += float(w) * ex[n].to_dense()
        out[n] = acc.to(s.dtype)
    return out


class TwinRouter(nn.Module):
    """The official ``SimpleMLP``: logits over the T tasks from an embedding (d → 2d → 2d → T,
    BatchNorm, LeakyReLU, Dropout 0.5)."""

    def __init__(self, dim: int, n_tasks: int, hidden: int | None = None) -> None:
        super().__init__()
        h = hidden or 2 * dim
        self.net = nn.Sequential(
            nn.Linear(dim, h),
            nn.BatchNorm1d(h),
            nn.LeakyReLU(),
            nn.Dropout(ROUTER_DROPOUT),
            nn.Linear(h, h),
            nn.BatchNorm1d(h),
            nn.LeakyReLU(),
            nn.Dropout(ROUTER_DROPOUT),
            nn.Linear(h, n_tasks),
        )

    def forward(self, embeddings: Tensor) -> Tensor:
        return self.net(embeddings.float())


def train_router(
    embeddings: Tensor,
    task_ids: Tensor,
    n_tasks: int,
    *,
    epochs: int = ROUTER_EPOCHS,
    lr: float = ROUTER_LR,
    batch_size: int = ROUTER_BATCH,
    hidden: int | None = None,
    seed: int = 0,
) -> TwinRouter:
    """The router trained to predict each embedding's task (cross-entropy; AdamW, weight
    decay 0, lr decayed linearly to 0 over the steps, seeded init and shuffling); returned
    in eval mode. A last batch of one row is dropped (BatchNorm needs two)."""
    if embeddings.dim() != 2 or len(embeddings) != len(task_ids):
        raise TwinMergingError("the router needs (N, d) embeddings and N task ids")
    if len(embeddings) < 2:
        raise TwinMergingError("the router needs at least two examples")
    if not (epochs > 0 and batch_size > 0 and lr > 0 and math.isfinite(lr)):
        raise TwinMergingError("epochs, batch_size and lr must be positive")
    ids = task_ids.long()
    if int(ids.min()) < 0 or int(ids.max()) >= n_tasks:
        raise TwinMergingError(f"task ids must be in [0, {n_tasks})")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    router = TwinRouter(embeddings.shape[1], n_tasks, hidden).train()
    x = embeddings.detach().float()
    per_epoch = math.ceil(len(x) / batch_size)
    steps = epochs * per_epoch
    opt = torch.optim.AdamW(router.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / steps))
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=gen)
            for start in range(0, len(x), batch_size):
                rows = order[start : start + batch_size]
                if len(rows) < 2:
                    continue
                loss = nn.functional.cross_entropy(router(x[rows]), ids[rows])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return router.eval()


@dataclass
class TwinMerging:
    """The shared model in an `AdapterModel`, one LoRA adapter per task holding its
    exclusive knowledge on the Linear layers, and the router (module docstring)."""

    am: AdapterModel
    tasks: list[str]
    router: TwinRouter | None = None
    top_k: int | None = None
    features: RouterFeatures = "last"
    # per task: the exclusive tensors not carried by its adapter (not a Linear weight)
    uncovered: dict[str, list[str]] = field(default_factory=dict)

    @property
    def adapter_names(self) -> list[str]:
        return [f"{ADAPTER_PREFIX}{i}" for i in range(len(self.tasks))]

    @classmethod
    def build(
        cls,
        model: nn.Module,
        exclusive: Mapping[str, Mapping[str, LowRank | Dense]],
        *,
        shared: State | None = None,
        router: TwinRouter | None = None,
        top_k: int | None = None,
        features: RouterFeatures = "last",
    ) -> TwinMerging:
        """Wrap ``model`` (its weights θ*, or ``shared`` loaded into it first; keys as its
        state dict, missing ones kept) and add each task's exclusive knowledge (a mapping task
        → `exclusive_knowledge`) as an adapter on the Linear layers whose ``<path>.weight``
        it holds as a `LowRank`. All-zero deltas are skipped (no adapter work for them).
        ``features``: what `embed` gives the router (module docstring)."""
        if features not in get_args(RouterFeatures):
            raise TwinMergingError(f"router features must be 'last' or 'layers', got {features!r}")
        if not exclusive:
            raise TwinMergingError("Twin-Merging needs at least one task")
        if shared is not None:
            unexpected = model.load_state_dict(dict(shared), strict=False).unexpected_keys
            if unexpected:
                raise TwinMergingError(f"the shared state does not fit the model: {unexpected[:3]}")
        linear = {f"{p}.weight": p for p, m in named_base_modules(model) if p and is_linear(m)}
        twin = cls(AdapterModel(model).eval(), list(exclusive), router, top_k, features)
        for name, (task, ex) in zip(twin.adapter_names, exclusive.items(), strict=True):
            factors, twin.uncovered[task] = {}, []
            for n, d in ex.items():
                if n in linear and isinstance(d, LowRank) and not d.transposed:
                    if bool((d.b != 0).any()) and bool((d.a != 0).any()):
                        factors[linear[n]] = d
                elif bool((d.to_dense() != 0).any()):
                    twin.uncovered[task].append(n)
            if factors:
                _add_factors(twin.am, name, factors)
        return twin

    @torch.no_grad()
    def embed(self, batch: Mapping[str, Tensor]) -> Tensor:
        """(rows, d) router inputs from the shared model (adapters off): its mean-pooled,
        L2-normalised last hidden state (``features`` "last", d = hidden), or every hidden
        state's, concatenated from the embeddings' up ("layers", d = (L + 1) · hidden)."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with self.am.disabled():
            out = self.am(**inputs, output_hidden_states=True)
        mask = batch["attention_mask"]
        if self.features == "last":
            return mean_pool(out.hidden_states[-1].float(), mask)
        return torch.cat([mean_pool(h.float(), mask) for h in out.hidden_states], dim=-1)

    def router_hidden(self, dim: int) -> int | None:
        """The router MLP's hidden width for embeddings of width ``dim``: None (2 · dim, the
        official) for "last"; 2 · the model's width for "layers" (2 · dim would make its
        hidden layers L + 1 times wider than the official MLP's)."""
        if self.features == "last":
            return None
        return 2 * int(self.am.model.config.hidden_size)

    @torch.no_grad()
    def weights(self, batch: Mapping[str, Tensor]) -> Tensor:
        """(rows, T) router weights: softmax of the router's logits (top-k renormalized if
        ``top_k``)."""
        if self.router is None:
            raise TwinMergingError("no router: train one (train_router) or pass weights")
        logits = self.router(self.embed(batch))
        return route(logits, self.top_k).weights

    def adapter_sets(self, weights: Tensor) -> list[dict[str, float] | str]:
        """One ``adapter_names`` entry per row: {twin_t: w_t} over the non-zero weights of
        the tasks that have an adapter; ``__base__`` for none."""
        if weights.dim() != 2 or weights.shape[1] != len(self.tasks):
            raise TwinMergingError(
                f"weights must be (rows, {len(self.tasks)}), got {list(weights.shape)}"
            )
        present = set(self.am.configs)
        out: list[dict[str, float] | str] = []
        for row in weights.tolist():
            s = {
                n: float(w)
                for n, w in zip(self.adapter_names, row, strict=True)
                if w != 0.0 and n in present
            }
            out.append(s or BASE_NAME)
        return out

    def __call__(self, batch: Mapping[str, Tensor], weights: Tensor | None = None) -> Any:
        """The model's output for ``batch``, row r run with θ* + Σ_t weights[r, t] τ̂_t
        (``weights`` None: the router's)."""
        w = self.weights(batch) if weights is None else weights
        return self.am(**batch, adapter_names=self.adapter_sets(w))


def _add_factors(am: AdapterModel, name: str, factors: Mapping[str, LowRank]) -> None:
    """A LoRA adapter ``name`` holding s · B A per module path (scale 1: alpha = r)."""
    from splice.adapters import LoraConfig

    ranks = {p: f.rank for p, f in factors.items()}
    r = max(ranks.values())
    pattern = {re.escape(p): k for p, k in ranks.items() if k != r}
    config = LoraConfig(
        r=r,
        lora_alpha=r,
        target_modules=sorted(factors),
        rank_pattern=pattern,
        alpha_pattern={k: float(v) for k, v in pattern.items()},
    )
    am.add_adapter(name, config, activate=False)
    modules = dict(am.named_adapter_modules(name))
    for path, f in factors.items():
        a = f.a.float().contiguous()
        b = (f.b.float() * f.scaling).contiguous()
        modules[path].load_peft_state({"lora_A.weight": a, "lora_B.weight": b}, f"{name}.{path}")
