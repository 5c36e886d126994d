"""splice's della / della_linear (mergekit dialect) against mergekit 0.1.5.

The draws cannot match (mergekit uses the global torch RNG), so: exact parity where the
method is deterministic (density 1, mergekit's default), and the same keep probabilities,
measured, where it is random.
"""

import pytest
import torch

mk_registry = pytest.importorskip("mergekit.merge_methods.registry")
mk_sparsify = pytest.importorskip("mergekit.sparsify")
from mergekit.merge_methods.base import TensorGroup  # noqa: E402

from splice.merge import MergeContext, get_method  # noqa: E402


def inputs(shape, n, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g) * 0.05
    return base, [base + torch.randn(shape, generator=g) * 0.01 for _ in range(n)]


@pytest.mark.parametrize("name", ["della", "della_linear"])
@pytest.mark.parametrize("shape", [(24, 40), (40,)])
@pytest.mark.parametrize(
    "params",
    [{"weight": [1.0, 0.5, 0.8]}, {"weight": [1.0, -0.5, 0.8], "normalize": True, "lambda": 0.7}],
)
def test_deterministic_parity(name, shape, params):
    base, tensors = inputs(shape, 3, 11)
    group = TensorGroup.from_tensors([base.clone()] + [t.clone() for t in tensors], base_index=0)
    (expected,) = mk_registry.get(name)([group], parameters=params)
    ctx = MergeContext(dialect="mergekit", tensor_name="w")
    actual = get_method(name)(base.clone(), [t.clone() for t in tensors], ctx, **params)
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-6)


def test_keep_probabilities_match_mergekit():
    # 3000 rows with the same magnitude order: both keep column j with probability
    # (d - eps) + 2 eps j / (n - 1); compare the measured rates (std ~0.009)
    delta = torch.arange(1.0, 9.0).repeat(3000, 1)
    torch.manual_seed(0)
    theirs = mk_sparsify.della_magprune(delta.clone(), density=0.4, epsilon=0.2)
    ours = get_method("della_linear")(
        torch.zeros_like(delta),
        [delta.clone()],
        MergeContext(dialect="mergekit", tensor_name="w"),
        density=0.4,
        epsilon=0.2,
        rescale=False,
    )
    expected = 0.2 + 0.4 * torch.arange(8) / 7
    torch.testing.assert_close((theirs != 0).float().mean(0), expected, atol=0.035, rtol=0)
    torch.testing.assert_close((ours != 0).float().mean(0), expected, atol=0.035, rtol=0)


def test_l1_rescale_matches_mergekit_norm():
    # rescale true: both restore the L1 norm of the task vector
    base, (t,) = inputs((16, 30), 1, 5)
    delta = t - base
    torch.manual_seed(1)
    theirs = mk_sparsify.della_magprune(
        delta.clone(), density=0.5, epsilon=0.1, rescale_norm=mk_sparsify.RescaleNorm.l1
    )
    ours = (
        get_method("della_linear")(
            base.clone(),
            [t.clone()],
            MergeContext(dialect="mergekit", tensor_name="w"),
            density=0.5,
            epsilon=0.1,
        )
        - base
    )
    torch.testing.assert_close(ours.abs().sum(), theirs.abs().sum(), rtol=1e-5, atol=0)
    torch.testing.assert_close(ours.abs().sum(), delta.abs().sum(), rtol=1e-5, atol=0)
