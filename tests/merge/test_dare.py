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
        monkeypatch.setattr(dare_module, "dare_mask", lambda shape, density, gen: queue.pop(0))

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
