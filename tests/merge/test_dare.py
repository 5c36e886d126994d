import importlib

import pytest
import torch
from merge_test_util import MERGEKIT, run

from splice.merge import MergeContext

dare_module = importlib.import_module("splice.merge.methods.dare")

BASE = [1.0] * 6
D1 = [3.0, -1.0, 2.0, 0.5, -4.0, 1.0]
D2 = [-2.0, 2.0, 1.0, -3.0, -1.0, 0.2]
M1 = [True, True, False, True, False, True]
M2 = [False, True, True, True, True, False]


def models(*deltas):
    return [[1.0 + x for x in d] for d in deltas]


@pytest.fixture
def fixed_masks(monkeypatch):
    """Replace the random draw with known masks, in model order."""

    def use(*masks):
        queue = [torch.tensor(m) for m in masks]
        monkeypatch.setattr(
            dare_module, "dare_mask", lambda shape, density, gen, offset=0: queue.pop(0)
        )
        monkeypatch.setattr(dare_module, "_dare_kernel", None)  # the draw goes through dare_mask

    return use


def test_apply_with_explicit_mask():
    mask = torch.tensor([True, False, True, False])

    def apply(rescale):
        return dare_module.dare_apply_(torch.tensor([2.0, -4.0, 6.0, 8.0]), mask, 0.5, rescale)

    assert torch.equal(apply("inverse"), torch.tensor([4.0, 0.0, 12.0, 0.0]))
    assert torch.equal(apply("none"), torch.tensor([2.0, 0.0, 6.0, 0.0]))
    assert torch.equal(apply(False), torch.tensor([2.0, 0.0, 6.0, 0.0]))
    # L1 20 before, 8 after: x2.5
    assert torch.equal(apply("l1"), torch.tensor([5.0, 0.0, 15.0, 0.0]))
    assert torch.equal(apply(True), torch.tensor([5.0, 0.0, 15.0, 0.0]))


def test_dare_linear_fixed_masks(fixed_masks):
    fixed_masks(M1, M2)
    out = run("dare_linear", BASE, models(D1, D2), density=0.5)
    # inverse rescale: D1 -> [6,-2,0,1,0,2], D2 -> [0,4,2,-6,-2,0]; sum + 1
    torch.testing.assert_close(out, torch.tensor([7.0, 3.0, 3.0, -4.0, -1.0, 3.0]))


def test_dare_ties_fixed_masks(fixed_masks):
    fixed_masks(M1, M2)
    out = run("dare_ties", BASE, models(D1, D2), density=0.5)
    # sum [6,2,2,-5,-2,2] -> [+,+,+,-,-,+]; agreeing means [6,4,2,-6,-2,2]; + 1
    torch.testing.assert_close(out, torch.tensor([7.0, 5.0, 3.0, -5.0, -1.0, 3.0]))


def test_mergekit_dialect_defaults_to_l1_rescale(fixed_masks):
    fixed_masks(M1)
    out = run("dare_linear", BASE, models(D1), ctx=MERGEKIT, density=0.5)
    # kept [3,-1,0,.5,0,1] (L1 5.5) scaled to L1 11.5: x 23/11
    expected = torch.tensor([1 + 69 / 11, 1 - 23 / 11, 1.0, 1 + 23 / 22, 1.0, 1 + 23 / 11])
    torch.testing.assert_close(out, expected)


def test_mergekit_dialect_dare_ties_sums(fixed_masks):
    fixed_masks(M1, M2)
    out = run("dare_ties", BASE, models(D1, D2), ctx=MERGEKIT, density=0.5, rescale=False)
    # masked D1 [3,-1,0,.5,0,1], D2 [0,2,1,-3,-1,0]; sum [3,1,1,-2.5,-1,1]
    # elected [+,+,+,-,-,+]; normalize false -> agreeing sums [3,2,1,-3,-1,1]
    torch.testing.assert_close(out, torch.tensor([4.0, 3.0, 2.0, -2.0, 0.0, 2.0]))


def test_deterministic_given_seed():
    big = torch.randn(4, 1000, generator=torch.Generator().manual_seed(1))
    base = torch.zeros(4, 1000)
    a = run(
        "dare_linear", base, [big, big * 2], ctx=MergeContext(seed=7, tensor_name="w"), density=0.3
    )
    b = run(
        "dare_linear", base, [big, big * 2], ctx=MergeContext(seed=7, tensor_name="w"), density=0.3
    )
    c = run(
        "dare_linear", base, [big, big * 2], ctx=MergeContext(seed=8, tensor_name="w"), density=0.3
    )
    d = run(
        "dare_linear", base, [big, big * 2], ctx=MergeContext(seed=7, tensor_name="v"), density=0.3
    )
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, d)


def test_density_one_is_task_arithmetic():
    ta = torch.tensor([2.0, 4.0, 9.0])  # see test_task_arithmetic
    kw = dict(weight=[0.5, 1.0], density=1.0, **{"lambda": 2.0})
    t1, t2 = [2.0, 0.0, 1.0], [1.0, 3.0, 5.0]
    torch.testing.assert_close(run("dare_linear", [1.0, 1.0, 1.0], [t1, t2], **kw), ta)
    torch.testing.assert_close(
        run("dare_linear", [1.0, 1.0, 1.0], [t1, t2], ctx=MERGEKIT, **kw), ta
    )


def test_density_zero_keeps_the_base():
    out = run("dare_ties", BASE, models(D1, D2), density=0.0)
    torch.testing.assert_close(out, torch.tensor(BASE))


def test_keep_fraction_is_density():
    delta = torch.ones(200_000)
    out = run("dare_linear", torch.zeros_like(delta), [delta], density=0.3, rescale="none")
    kept = float((out != 0).float().mean())
    assert abs(kept - 0.3) < 0.005  # std of the fraction ~0.001


def test_inverse_rescale_preserves_expected_value():
    delta = torch.tensor([3.0, -1.0, 2.0, 0.5])

    def mean_of_draws(rescale):
        return torch.stack(
            [
                run(
                    "dare_linear",
                    torch.zeros(4),
                    [delta],
                    ctx=MergeContext(seed=s),
                    density=0.3,
                    rescale=rescale,
                )
                for s in range(2000)
            ]
        ).mean(dim=0)

    # per entry: std of one draw = |d| sqrt(0.7/0.3) (<= 4.6), of the mean <= 0.1
    torch.testing.assert_close(mean_of_draws("inverse"), delta, atol=0.4, rtol=0)
    # without rescale the expectation shrinks to density * delta (std of mean <= 0.03)
    torch.testing.assert_close(mean_of_draws("none"), 0.3 * delta, atol=0.12, rtol=0)


needs_kernel = pytest.mark.skipif(
    dare_module._dare_kernel is None, reason="the _dare_kernel extension is not built"
)


def _torch_drop(delta, density, seed):
    return delta * dare_module.dare_mask(delta.shape, density, dare_module.seeded_generator(seed))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("n", "density"),
    [(1, 0.5), (312, 0.0), (313, 1.0), (624, 1e-9), (1000, 0.999999), (31337, 0.3)],
)
def test_compiled_drop_is_torchs_draw(dtype, n, density):
    g = torch.Generator().manual_seed(n)
    for seed in (0, 1, 2**32 - 1, 2**32 + 5, 2**63 - 1):
        delta = (torch.randn(n, generator=g) * 1e-3).to(dtype)
        delta[::7] = -delta[::7].abs()  # negative entries: dropped ones keep their sign (-0.0)
        want = _torch_drop(delta, density, seed)
        got = delta.clone()
        buf = got.view(torch.int16) if dtype == torch.bfloat16 else got
        assert dare_module._dare_kernel.drop(buf.numpy(), got.element_size(), seed, density)
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


@needs_kernel
def test_compiled_drop_leaves_non_finite_deltas_to_torch():
    delta = torch.tensor([1.0, float("nan"), 2.0, float("inf")])
    assert not dare_module._dare_kernel.drop(delta.numpy(), 4, 7, 0.5)
    assert torch.equal(delta[[0, 2]], torch.tensor([1.0, 2.0]))  # untouched
    got = dare_module.dare_drop_(delta.clone(), 0.5, 7, "none")
    want = _torch_drop(delta, 0.5, 7)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(), want.nan_to_num())
    # the L1 rescale after the kernel declined: its |δ|_1 and a work buffer, as torch alone
    mask = dare_module.dare_mask(delta.shape, 0.5, dare_module.seeded_generator(7))
    want = dare_module.dare_apply_(delta.clone(), mask, 0.5, True)
    got = dare_module.dare_drop_(delta.clone(), 0.5, 7, True, work=torch.full((6,), 9.0))
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(), want.nan_to_num())


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rescale", ["inverse", "l1", "none", True, False])
def test_dare_drop_compiled_equals_torch_path(monkeypatch, dtype, rescale):
    delta = (torch.randn(64, 48, generator=torch.Generator().manual_seed(3)) * 0.01).to(dtype)
    fast = dare_module.dare_drop_(delta.clone(), 0.3, 12345, rescale)
    monkeypatch.setattr(dare_module, "_dare_kernel", None)
    slow = dare_module.dare_drop_(delta.clone(), 0.3, 12345, rescale)
    assert fast.count_nonzero() < delta.numel() * 0.5  # something was dropped
    assert torch.equal(fast.view(torch.uint8), slow.view(torch.uint8))


def _row_chunks_of_drop(delta, density, seed, spans, rescale="inverse"):
    """``dare_drop_`` on each span of rows [a, b) with its first flat entry as the offset,
    the chunks concatenated."""
    cols = delta[0].numel()
    return torch.cat(
        [
            dare_module.dare_drop_(delta[a:b].clone(), density, seed, rescale, a * cols)
            for a, b in spans
        ]
    )


# 97 rows of 41 entries (3977): chunks of 1, 7 and 30 rows start at offsets that are not
# multiples of 312 (or 624) and cross the 312-entry blocks of the generator's words
_SPANS = [(0, 1), (1, 8), (8, 38), (38, 45), (45, 96), (96, 97)]


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rescale", ["inverse", "none"])
def test_a_drop_with_an_offset_is_the_slice_of_the_whole_drop(
    monkeypatch, compiled, dtype, rescale
):
    if compiled and dare_module._dare_kernel is None:
        pytest.skip("the _dare_kernel extension is not built")
    if not compiled:
        monkeypatch.setattr(dare_module, "_dare_kernel", None)
    delta = (torch.randn(97, 41, generator=torch.Generator().manual_seed(5)) * 0.01).to(dtype)
    delta[::3] = -delta[::3].abs()  # dropped negative entries keep their sign (-0.0)
    seed = 2**40 + 17
    whole = dare_module.dare_drop_(delta.clone(), 0.3, seed, rescale)
    chunked = _row_chunks_of_drop(delta, 0.3, seed, _SPANS, rescale)
    assert 0 < whole.count_nonzero() < delta.numel() * 0.5
    assert torch.equal(chunked.view(torch.uint8), whole.view(torch.uint8))
    # every chunk drawn from the start of the stream (offset 0) is another mask
    naive = torch.cat(
        [dare_module.dare_drop_(delta[a:b].clone(), 0.3, seed, rescale) for a, b in _SPANS]
    )
    assert not torch.equal(naive.view(torch.uint8), whole.view(torch.uint8))


@needs_kernel
@pytest.mark.parametrize(
    ("n", "offset"),
    [
        (1, 1),
        (1, 311),
        (1, 312),
        (5, 310),
        (313, 1),
        (312, 312),
        (700, 623),
        (1000, 625),
        (3, 10**6 + 3),
        (2000, 31337),
    ],
)
def test_the_compiled_drop_at_an_offset_is_torchs_slice(n, offset):
    """Offsets inside the first block, at and across 312 / 624, many blocks on: the kernel
    skips 2 · offset words (whole blocks by the twist alone)."""
    seed = 977 + offset
    whole = torch.empty(offset + n, dtype=torch.bool).bernoulli_(
        0.4, generator=dare_module.seeded_generator(seed)
    )
    delta = torch.randn(n, generator=torch.Generator().manual_seed(n)) + 3  # no zero
    got = delta.clone()
    assert dare_module._dare_kernel.drop(got.numpy(), 4, seed, 0.4, offset)
    assert torch.equal(got != 0, whole[offset:])


def test_skipping_to_an_offset_in_blocks_concatenates_torchs_draws(monkeypatch):
    """torch takes two words per entry whatever the size of a draw: an offset skipped in
    blocks (here 100 entries, a partial last one) gives the slice of one draw."""
    assert dare_module.split_draws_agree()
    monkeypatch.setattr(importlib.import_module("splice.merge.sparsify"), "SKIP_BLOCK", 100)
    whole = torch.empty(1357 + 50, dtype=torch.bool).bernoulli_(
        0.5, generator=dare_module.seeded_generator(3)
    )
    part = dare_module.dare_mask(torch.Size([5, 10]), 0.5, dare_module.seeded_generator(3), 1357)
    assert torch.equal(part.reshape(-1), whole[1357:])


def test_the_self_checks_cover_offsets():
    offsets = [o for _, o, _ in dare_module._OFFSET_CHECKS]
    assert any(o % 312 for o in offsets) and max(offsets) > 624
    if dare_module._dare_kernel is not None:
        assert dare_module.compiled_drop_agrees()


def test_the_l1_rescale_takes_no_offset():
    with pytest.raises(ValueError, match="whole tensor"):
        dare_module.dare_drop_(torch.ones(4), 0.5, 1, "l1", offset=8)
    with pytest.raises(ValueError, match="whole tensor"):
        dare_module.dare_drop_(torch.ones(4), 0.5, 1, True, offset=8)


def test_dare_row_chunks_except_the_mergekit_l1_rescale():
    for rescale, dialect, chunks in (
        ("inverse", "splice", True),
        ("none", "splice", True),
        (False, "mergekit", True),
        ("l1", "splice", True),  # the norms: row-order sums, from a pre-pass over the chunks
        (True, "splice", True),
        (True, "mergekit", False),  # torch's whole-tensor sums
    ):
        assert dare_module.dare_chunks({"rescale": rescale}, dialect, 2) is chunks


def test_splice_l1_rescale_with_fixed_masks(fixed_masks):
    fixed_masks(M1)
    out = run("dare_linear", BASE, models(D1), density=0.5, rescale="l1")
    # kept [3,-1,0,.5,0,1] (L1 5.5) scaled to L1 11.5: x 23/11
    expected = torch.tensor([1 + 69 / 11, 1 - 23 / 11, 1.0, 1 + 23 / 22, 1.0, 1 + 23 / 11])
    torch.testing.assert_close(out, expected)


def test_splice_l1_rescale_takes_the_answered_norms(fixed_masks):
    """A row chunk's rescale is the whole tensor's (`DARE_L1`, columns |δ|, |m ⊙ δ| per
    model), not its own rows': 12 / 3 = x4 here, where the rows alone give x 23/11."""
    fixed_masks(M1)
    totals = torch.tensor([12.0, 3.0], dtype=torch.float64)
    ctx = MergeContext(model_stats={dare_module.DARE_L1: totals})
    out = run("dare_linear", BASE, models(D1), density=0.5, rescale="l1", ctx=ctx)
    torch.testing.assert_close(out, torch.tensor([13.0, -3.0, 1.0, 3.0, 1.0, 5.0]))


def test_l1_partials_are_per_row_norms_before_and_after_the_drop(fixed_masks):
    fixed_masks([M1[:3], M1[3:]])
    base = torch.ones(2, 3)
    tensors = [torch.tensor(models(D1)).reshape(2, 3), torch.tensor(models(D2)).reshape(2, 3)]
    params = {"density": [0.5, 1.0], "rescale": "l1"}
    got = dare_module.dare_l1_partials(base, tensors, MergeContext(), params)
    # model 0: rows |3|+|-1|+|2| = 6, |.5|+|-4|+|1| = 5.5; kept [3,-1,0], [.5,0,1]: 4, 1.5
    # model 1 (density 1: not dropped): zeros
    assert got.tolist() == [[6.0, 4.0, 0.0, 0.0], [5.5, 1.5, 0.0, 0.0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("threads", [2, 3])
def test_mergekit_l1_rescale_sums_in_mergekits_thread_order(monkeypatch, dtype, threads):
    """Over 2^15 entries torch splits ``abs().sum()`` over its threads, so mergekit's L1
    ratio depends on its thread count: with SPLICE_MERGEKIT_THREADS set to it, DARE's drop
    (compiled or torch's) gives the bits of mergekit's ``rescaled_masked_tensor`` on the
    same mask, run with that many threads; summed serially (the splice dialect's order)
    some of them differ."""
    sparsify = pytest.importorskip("mergekit.sparsify")
    monkeypatch.setenv("SPLICE_MERGEKIT_THREADS", str(threads))
    threads_of = dare_module.l1_threads("mergekit")
    assert threads_of == threads
    density, serial_differs = 0.3, []
    for seed in range(6):
        gen = torch.Generator().manual_seed(seed)
        delta = (torch.randn(300, 331, generator=gen) * 0.01).to(dtype)
        mask = dare_module.dare_mask(delta.shape, density, dare_module.seeded_generator(seed))
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            want = sparsify.rescaled_masked_tensor(delta, mask, sparsify.RescaleNorm.l1)
        finally:
            torch.set_num_threads(old)
        got = dare_module.dare_drop_(delta.clone(), density, seed, True, 0, threads_of)
        assert torch.equal(got, want)
        # with a shared |δ| buffer larger than δ, dirty from an earlier sum (as `dare_` uses)
        work = torch.full((delta.numel() + 7,), 123.0, dtype=dtype)
        reused = dare_module.dare_drop_(delta.clone(), density, seed, True, 0, threads_of, work)
        assert torch.equal(reused, want)
        torch_path = dare_module.dare_apply_(delta.clone(), mask, density, True, threads_of)
        assert torch.equal(torch_path, want)
        serial = dare_module.dare_apply_(delta.clone(), mask, density, True, 1)
        serial_differs.append(not torch.equal(serial, want))
    assert any(serial_differs)
