"""The engine's left-padded batch cache (`splice.serve.kv_batch`): joining caches of
different lengths, appending steps in place (also past the spare columns), dropping rows and
the padding columns no kept row uses; values checked against the layout built by hand."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from splice.serve.kv_batch import MIN_SPARE, KVBatch, SpareColumnsLayer

HEADS, DIM, LAYERS = 2, 3, 2


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def prefill_cache(rows: int, width: int, seed: int) -> DynamicCache:
    cache = DynamicCache()
    for layer in range(LAYERS):
        k = rand(rows, HEADS, width, DIM, seed=seed + 10 * layer)
        cache.update(k, k + 100, layer)  # values: keys + 100
    return cache


def test_join_step_keep() -> None:
    a = prefill_cache(1, 3, seed=1)
    b = prefill_cache(2, 4, seed=2)
    b_mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    a_keys = [layer.keys.clone() for layer in a.layers]
    b_keys = [layer.keys.clone() for layer in b.layers]

    batch = KVBatch.of_prefill(a, torch.ones(1, 3, dtype=torch.long))
    batch.join(KVBatch.of_prefill(b, b_mask))
    assert batch.mask.tolist() == [[0, 1, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1]]
    assert batch.lengths.tolist() == [3, 2, 4]
    for layer, ak, bk in zip(batch.cache.layers, a_keys, b_keys, strict=True):
        assert isinstance(layer, SpareColumnsLayer)
        want = torch.zeros(3, HEADS, 4, DIM)
        want[0, :, 1:] = ak[0]
        want[1, :, 2:] = bk[0, :, 2:]  # the padding columns are zeroed
        want[2] = bk[1]
        assert torch.equal(layer.keys, want)
        assert torch.equal(layer.values[1, :, 2:], want[1, :, 2:] + 100)
        assert torch.equal(layer.values[1, :, :2], torch.zeros(HEADS, 2, DIM))

    mask, positions = batch.step_inputs()
    assert mask.tolist() == [[0, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert positions.tolist() == [[3], [2], [4]]

    before = [layer.keys.clone() for layer in batch.cache.layers]
    steps = MIN_SPARE + 6  # past the first buffer's spare columns
    new = [rand(3, HEADS, steps, DIM, seed=50 + i) for i in range(LAYERS)]
    for t in range(steps):
        for i, layer in enumerate(batch.cache.layers):
            k, _ = layer.update(new[i][:, :, t : t + 1], new[i][:, :, t : t + 1] - 1)
            assert k.shape[-2] == 5 + t
        batch.advance()
    for layer, old, n in zip(batch.cache.layers, before, new, strict=True):
        assert torch.equal(layer.keys, torch.cat([old, n], dim=2))
        assert torch.equal(layer.values[:, :, 4:], n - 1)
    assert batch.lengths.tolist() == [3 + steps, 2 + steps, 4 + steps]
    assert batch.width == 4 + steps

    full = [layer.keys.clone() for layer in batch.cache.layers]
    batch.keep([1, 0])  # the longest row leaves: the first column is padding in both others
    assert batch.lengths.tolist() == [2 + steps, 3 + steps]
    assert batch.mask.tolist() == [[0] + [1] * (2 + steps), [1] * (3 + steps)]
    for layer, f in zip(batch.cache.layers, full, strict=True):
        assert torch.equal(layer.keys, f[[1, 0], :, 1:])
    batch.keep([])
    assert batch.rows == 0 and batch.cache is None


def test_prefill_with_scattered_real_columns_is_right_aligned() -> None:
    """Prompt / prefix tuning rows: a prefix slot, a virtual-token slot and input slots, each
    left-padded, leave real columns apart; they move to the row's end, in order."""
    cache = prefill_cache(2, 5, seed=3)
    keys = [layer.keys.clone() for layer in cache.layers]
    mask = torch.tensor([[1, 0, 0, 1, 1], [0, 1, 0, 0, 1]])
    batch = KVBatch.of_prefill(cache, mask)
    assert batch.mask.tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 1, 1]]
    assert batch.lengths.tolist() == [3, 2]
    for layer, before in zip(cache.layers, keys, strict=True):
        torch.testing.assert_close(layer.keys[0, :, 2:], before[0, :, [0, 3, 4]])
        torch.testing.assert_close(layer.keys[1, :, 3:], before[1, :, [1, 4]])
        torch.testing.assert_close(layer.values, layer.keys + 100 * (batch.mask[:, None, :, None]))
        assert bool((layer.keys[0, :, :2] == 0).all()) and bool((layer.keys[1, :, :3] == 0).all())
