"""Twin-Merging (splice.compose.twin_merging) against its definition on small inputs."""

from __future__ import annotations

import pytest
import torch

from splice.compose.twin_merging import (
    TwinMerging,
    TwinMergingError,
    exclusive_knowledge,
    train_router,
    twin_state,
)
from splice.delta import Dense, LowRank
from tiny_hf import tiny_bert_config


def test_exclusive_is_the_truncated_svd_of_expert_minus_shared():
    # τ = diag(3, 2, 1) rotated: known singular values 3, 2, 1
    q, _ = torch.linalg.qr(torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 1.0]]))
    tau = q @ torch.diag(torch.tensor([3.0, 2.0, 1.0])) @ q.T
    shared = {"w": torch.ones(3, 3), "ln": torch.tensor([1.0, 1.0])}
    expert = {"w": torch.ones(3, 3) + tau, "ln": torch.tensor([1.5, 0.5])}
    ex = exclusive_knowledge(shared, expert, rank=1)
    assert isinstance(ex["w"], LowRank) and ex["w"].rank == 1
    best = 3.0 * torch.outer(q[:, 0], q[:, 0])  # Eckart–Young: the top triplet
    torch.testing.assert_close(ex["w"].to_dense(), best, atol=1e-5, rtol=0)
    # 1-D tensors are kept whole (the official sparsify.svd returns them unchanged)
    assert isinstance(ex["ln"], Dense)
    torch.testing.assert_close(ex["ln"].to_dense(), torch.tensor([0.5, -0.5]))
    # fraction: k = ⌊3 · 0.7⌋ = 2, error = the dropped singular value 1 (spectral norm)
    two = exclusive_knowledge(shared, expert, fraction=0.7)["w"]
    assert two.rank == 2
    assert torch.linalg.matrix_norm(tau - two.to_dense(), ord=2) == pytest.approx(1.0, abs=1e-5)
    # the default fraction 0.1 of min(3, 3) clamps to rank 1
    assert exclusive_knowledge(shared, expert)["w"].rank == 1


def test_twin_state_is_shared_plus_weighted_exclusives():
    shared = {"w": torch.tensor([[1.0, 0.0], [0.0, 1.0]])}
    e1 = {"w": torch.tensor([[3.0, 0.0], [0.0, 1.0]])}  # τ_1 = diag(2, 0)
    e2 = {"w": torch.tensor([[1.0, 0.0], [0.0, 5.0]])}  # τ_2 = diag(0, 4)
    ex = [exclusive_knowledge(shared, e, rank=2) for e in (e1, e2)]
    got = twin_state(shared, ex, [0.25, 0.75])["w"]
    torch.testing.assert_close(got, torch.tensor([[1.5, 0.0], [0.0, 4.0]]), atol=1e-6, rtol=0)
    # one-hot with full rank: the expert itself
    torch.testing.assert_close(twin_state(shared, ex, [0.0, 1.0])["w"], e2["w"])
    with pytest.raises(TwinMergingError):
        twin_state(shared, ex, [1.0])


def test_exclusive_checks_names_and_shapes():
    with pytest.raises(TwinMergingError, match="missing from the expert"):
        exclusive_knowledge({"a": torch.zeros(2)}, {"b": torch.zeros(2)})
    with pytest.raises(TwinMergingError, match="shape"):
        exclusive_knowledge({"a": torch.zeros(2)}, {"a": torch.zeros(3)})


def _bert(seed: int):
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = tiny_bert_config(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=32,
        num_labels=2,
    )
    return BertForSequenceClassification(cfg).eval()


def _experts():
    """A base and two experts that differ from it in every Linear weight only (randomly)."""
    base = _bert(0).state_dict()
    experts = []
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        e = {}
        for n, v in base.items():
            linear_weight = v.dim() == 2 and "embeddings" not in n
            e[n] = v + 0.05 * torch.randn(v.shape, generator=g) if linear_weight else v.clone()
        experts.append(e)
    shared = {n: (base[n] + 0.3 * sum(e[n] - base[n] for e in experts)) for n in base}
    return shared, experts


BATCH = {
    "input_ids": torch.tensor([[2, 5, 9, 11, 3], [2, 7, 3, 0, 0], [2, 6, 6, 8, 3]]),
    "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
}


def _logits(state):
    model = _bert(0)
    model.load_state_dict(state)
    with torch.no_grad():
        return model(**BATCH).logits


@pytest.mark.parametrize("rank", [16, 3])
def test_mixed_forward_equals_the_per_input_merged_model(rank):
    """Each row of one mixed-adapter forward = the model θ* + Σ w_t τ̂_t of its own weights
    (the paper's per-input merge, materialized); rank 16 = full rank here, so a one-hot row
    is exactly its expert."""
    shared, experts = _experts()
    ex = {f"t{i}": exclusive_knowledge(shared, e, rank=rank) for i, e in enumerate(experts)}
    twin = TwinMerging.build(_bert(0), ex, shared=shared)
    # Linear weights only differ, so nothing is left uncovered (the head is no part of it:
    # its weight is a Linear weight too, and the same in every state)
    assert twin.uncovered == {"t0": [], "t1": []}
    w = torch.tensor([[1.0, 0.0], [0.2, 0.8], [0.0, 0.0]])
    with torch.no_grad():
        got = twin(BATCH, w).logits
    for r in range(3):
        want = _logits(twin_state(shared, list(ex.values()), w[r].tolist()))[r]
        torch.testing.assert_close(got[r], want, atol=1e-5, rtol=1e-5)
    if rank == 16:
        torch.testing.assert_close(got[0], _logits(experts[0])[0], atol=1e-5, rtol=1e-5)
    else:  # compressed: row 0 is not the expert
        assert not torch.allclose(got[0], _logits(experts[0])[0], atol=1e-5)
    # all-zero weights: the shared model alone
    torch.testing.assert_close(got[2], _logits(shared)[2], atol=1e-5, rtol=1e-5)


def test_uncovered_tensors_are_reported():
    shared, experts = _experts()
    experts[0]["bert.encoder.layer.0.output.LayerNorm.weight"] += 0.5
    ex = {"t0": exclusive_knowledge(shared, experts[0], rank=2)}
    twin = TwinMerging.build(_bert(0), ex, shared=shared)
    assert twin.uncovered == {"t0": ["bert.encoder.layer.0.output.LayerNorm.weight"]}


def test_router_learns_separable_tasks_and_routes_with_softmax():
    g = torch.Generator().manual_seed(0)
    centers = 3 * torch.eye(16)[:3]  # three tasks, well apart in a 16-d embedding space
    ids = torch.arange(3).repeat_interleave(40)
    x = centers[ids] + 0.3 * torch.randn(len(ids), 16, generator=g)
    router = train_router(x, ids, 3, epochs=50, batch_size=16, seed=0)
    assert not router.training
    with torch.no_grad():
        assert router(centers).argmax(-1).tolist() == [0, 1, 2]
        assert (router(x).argmax(-1) == ids).all()
    # the twin's weights are softmax(logits), rows summing to 1
    shared, experts = _experts()
    ex = {f"t{i}": exclusive_knowledge(shared, e, rank=2) for i, e in enumerate(experts)}
    twin = TwinMerging.build(_bert(0), ex, shared=shared)
    twin.router = train_router(torch.randn(8, 16, generator=g), torch.tensor([0, 1] * 4), 2)
    w = twin.weights(BATCH)
    with torch.no_grad():
        torch.testing.assert_close(w, torch.softmax(twin.router(twin.embed(BATCH)), -1))
    torch.testing.assert_close(w.sum(-1), torch.ones(3))
    twin.top_k = 1
    assert twin.weights(BATCH).max(-1).values.tolist() == [1.0, 1.0, 1.0]


def test_router_is_seeded_and_validates():
    x, ids = torch.randn(10, 4, generator=torch.Generator().manual_seed(1)), torch.arange(10) % 2
    a = train_router(x, ids, 2, epochs=3, seed=5)
    b = train_router(x, ids, 2, epochs=3, seed=5)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    with pytest.raises(TwinMergingError, match="task ids"):
        train_router(x, ids + 1, 2)
    with pytest.raises(TwinMergingError, match="at least two"):
        train_router(x[:1], ids[:1], 2)
    twin = TwinMerging.build(_bert(0), {"t0": {}})
    with pytest.raises(TwinMergingError, match="no router"):
        twin.weights(BATCH)
    with pytest.raises(TwinMergingError, match="weights must be"):
        twin.adapter_sets(torch.ones(3, 2))


def test_layers_features_are_every_hidden_states_masked_mean_normalised():
    """``features="layers"``: [m_0; ...; m_L] with m_l = mean over the unpadded tokens of the
    shared model's hidden state l, divided by its L2 norm (by hand here); "last" is m_L
    alone; the router's hidden width is 2 · the model's for "layers" and the official
    2 · dim (None) for "last"."""
    shared, experts = _experts()
    ex = {f"t{i}": exclusive_knowledge(shared, e, rank=2) for i, e in enumerate(experts)}
    layers = TwinMerging.build(_bert(0), ex, shared=shared, features="layers")
    last = TwinMerging.build(_bert(0), ex, shared=shared)
    model = _bert(0)
    model.load_state_dict(shared)
    with torch.no_grad():
        hidden = model(**BATCH, output_hidden_states=True).hidden_states
    assert len(hidden) == 2  # the embeddings and one layer
    mask = BATCH["attention_mask"]
    blocks = []
    for h in hidden:
        rows = []
        for r in range(3):
            n = int(mask[r].sum())
            mean = h[r, :n].sum(0) / n
            rows.append(mean / mean.norm())
        blocks.append(torch.stack(rows))
    got = layers.embed(BATCH)
    assert got.shape == (3, 32)
    torch.testing.assert_close(got, torch.cat(blocks, -1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last.embed(BATCH), blocks[-1], atol=1e-5, rtol=1e-5)
    assert (layers.router_hidden(32), last.router_hidden(16)) == (32, None)
    router = train_router(got, torch.tensor([0, 1, 0]), 2, epochs=1, hidden=32)
    assert router.net[0].weight.shape == (32, 32)
    with pytest.raises(TwinMergingError, match="'last' or 'layers'"):
        TwinMerging.build(_bert(0), ex, shared=shared, features="cls")
