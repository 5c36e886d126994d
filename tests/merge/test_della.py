import importlib

import pytest
import torch
from merge_test_util import MERGEKIT, run

from splice.errors import MergeValidationError
from splice.merge import MergeContext

della_module = importlib.import_module("splice.merge.methods.della")
keep_prob = della_module.magprune_keep_prob

D1 = [0.5, -3.0, 1.0, 2.0]
D2 = [-1.0, 1.0, 2.0, -0.5]


@pytest.fixture
def fixed_masks(monkeypatch):
    """Replace the random draw with known masks, in model order."""

    def use(*masks):
        queue = [torch.tensor(m) for m in masks]
        monkeypatch.setattr(della_module, "magprune_mask", lambda prob, gen, offset=0: queue.pop(0))

    return use


def test_keep_probability_is_linear_in_rank():
    # ranks of |D1| = [0, 3, 1, 2]; k = 0.4 + 0.2 * rank / 3
    prob = keep_prob(torch.tensor(D1), 0.5, 0.1)
    torch.testing.assert_close(prob, torch.tensor([0.4, 0.6, 0.4 + 0.2 / 3, 0.4 + 0.4 / 3]))


def test_keep_probability_rows_ties_and_single_entries():
    # each row on its own: [1,2] -> ranks [0,1]; [4,3] -> [1,0]
    rows = keep_prob(torch.tensor([[1.0, 2.0], [4.0, -3.0]]), 0.5, 0.1)
    torch.testing.assert_close(rows, torch.tensor([[0.4, 0.6], [0.6, 0.4]]))
    # equal magnitudes: consecutive ranks in flat order
    torch.testing.assert_close(keep_prob(torch.ones(3), 0.5, 0.1), torch.tensor([0.4, 0.5, 0.6]))
    # one entry per row: the density itself
    torch.testing.assert_close(keep_prob(torch.ones(3, 1), 0.3, 0.1), torch.full((3, 1), 0.3))


def test_della_linear_inverse_rescale(fixed_masks):
    fixed_masks([True, True, False, True])
    out = run("della_linear", [0.0] * 4, [D1], density=0.5, epsilon=0.1)
    # kept entries divided by their keep probabilities [.4, .6, -, .4 + .4/3]
    expected = torch.tensor([0.5 / 0.4, -3.0 / 0.6, 0.0, 2.0 / (0.4 + 0.4 / 3)])
    torch.testing.assert_close(out, expected)


def test_della_ties_fixed_masks(fixed_masks):
    fixed_masks([True, True, False, True], [True, True, True, False])
    out = run(
        "della",
        [1.0] * 4,
        [[1 + x for x in d] for d in (D1, D2)],
        density=0.5,
        epsilon=0.1,
        rescale="none",
    )
    # masked D1 [.5,-3,0,2], D2 [-1,1,2,0]; sum [-.5,-2,2,2] -> signs [-,-,+,+]
    # agreeing means [-1, -3, 2, 2]; + 1
    torch.testing.assert_close(out, torch.tensor([0.0, -2.0, 3.0, 3.0]))


def test_mergekit_dialect_l1_rescale(fixed_masks):
    fixed_masks([True, True, False, True])
    out = run("della_linear", [0.0] * 4, [D1], ctx=MERGEKIT, density=0.5, epsilon=0.1)
    # kept [.5,-3,0,2] (L1 5.5) scaled to L1 6.5
    torch.testing.assert_close(out, torch.tensor([0.5, -3.0, 0.0, 2.0]) * (6.5 / 5.5))


def test_density_one_is_task_arithmetic_and_zero_is_base():
    out = run("della_linear", [1.0] * 4, [[1 + x for x in d] for d in (D1, D2)], density=1.0)
    torch.testing.assert_close(out, torch.tensor([0.5, -1.0, 4.0, 2.5]))
    out = run("della", [1.0] * 4, [[1 + x for x in d] for d in (D1, D2)], density=0.0)
    torch.testing.assert_close(out, torch.ones(4))


def test_epsilon_must_keep_probabilities_inside_0_1():
    with pytest.raises(MergeValidationError, match=r"density ± epsilon must lie in \(0, 1\)"):
        run("della", [0.0], [[1.0]], density=0.9, epsilon=0.15)
    with pytest.raises(MergeValidationError, match="'density'"):
        run("della_linear", [0.0], [[1.0]])  # required in the splice dialect


def test_keep_rate_follows_rank_and_expectation_is_kept():
    # 4000 rows with the same order: column j is kept with probability .35 + .3 j / 9
    row = torch.arange(1.0, 11.0)
    delta = row.repeat(4000, 1)
    ctx = MergeContext(seed=3, tensor_name="w")
    out = run(
        "della_linear",
        torch.zeros_like(delta),
        [delta],
        ctx=ctx,
        density=0.5,
        epsilon=0.15,
        rescale="none",
    )
    rate = (out != 0).float().mean(0)
    expected = 0.35 + 0.3 * torch.arange(10) / 9
    torch.testing.assert_close(rate, expected, atol=0.03, rtol=0)  # std ~0.008
    out = run("della_linear", torch.zeros_like(delta), [delta], ctx=ctx, density=0.5, epsilon=0.15)
    torch.testing.assert_close(out.mean(0), row, atol=0.3, rtol=0.03)


def test_deterministic_given_seed():
    x = torch.randn(8, 50, generator=torch.Generator().manual_seed(0))
    a, b, c = (
        run(
            "della",
            torch.zeros(8, 50),
            [x, -x],
            ctx=MergeContext(seed=s, tensor_name="w"),
            density=0.4,
        )
        for s in (1, 1, 2)
    )
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_a_mask_at_an_offset_is_the_slice_of_the_whole_mask():
    """torch draws a float32-probability Bernoulli mask one generator word per entry, so
    discarding the first `offset` draws (in blocks) gives that slice of the whole mask,
    across `SKIP_BLOCK` too; drawing the slice from the start gives another mask."""
    from splice.merge.methods import della

    prob = torch.rand(3000, generator=torch.Generator().manual_seed(1))
    whole = della.magprune_mask(prob, torch.Generator().manual_seed(7))
    for offset in (1, 311, 1234, 2999):
        part = della.magprune_mask(prob[offset:], torch.Generator().manual_seed(7), offset)
        assert torch.equal(part, whole[offset:])
    naive = della.magprune_mask(prob[1234:], torch.Generator().manual_seed(7))
    assert not torch.equal(naive, whole[1234:])
    assert della.magprune_draws_split()


def test_della_row_chunks_except_the_l1_rescale_and_1d():
    from splice.merge.methods import della

    for rescale, dialect, ndim, chunks in (
        ("inverse", "splice", 2, True),
        ("none", "splice", 3, True),
        (False, "mergekit", 2, True),
        ("l1", "splice", 2, False),
        (True, "mergekit", 2, False),
        ("inverse", "splice", 1, False),
    ):
        assert della.della_chunks({"rescale": rescale}, dialect, ndim) is chunks
