"""Reversible model merging: closed-form basis + coefficients, store and recover."""

import pytest
import torch
from lora_test_util import make_adapter

from splice.delta import LowRank
from splice.errors import MergeValidationError
from splice.lora_merge.rmm import build_rmm, fit_factor, fit_module, recover_adapter, recover_module
from splice.peft import read_lora_adapters


def test_fit_factor_hand_computed():
    # Rows X = [[1,0],[0,1],[1,1]]; XᵀX = [[2,1],[1,2]] has top eigenvector [1,1]/√2 (λ=3).
    # k=1: task 1 -> projection of [1,0] = [.5,.5]; task 3 -> [1,1] exactly.
    stack = [
        torch.tensor([[1.0], [0.0]]),
        torch.tensor([[0.0], [1.0]]),
        torch.tensor([[1.0], [1.0]]),
    ]
    f = fit_factor(stack, 1)
    assert f.basis.shape == (1, 2, 1) and f.coeffs.shape == (3, 1)
    torch.testing.assert_close(f.recover(0), torch.tensor([[0.5], [0.5]]))
    torch.testing.assert_close(f.recover(1), torch.tensor([[0.5], [0.5]]))
    torch.testing.assert_close(f.recover(2), torch.tensor([[1.0], [1.0]]))
    # k = n: exact
    f3 = fit_factor(stack, 3)
    for i, t in enumerate(stack):
        torch.testing.assert_close(f3.recover(i), t)


def test_fit_module_recovers_mixed_ranks_exactly_with_k_equal_n():
    g = torch.Generator().manual_seed(0)
    tasks = [
        LowRank(torch.randn(8, r, generator=g), torch.randn(r, 6, generator=g), s)
        for r, s in ((3, 2.0), (2, 0.5), (3, 1.0))
    ]
    fb, fa = fit_module(tasks, 3)
    for i, t in enumerate(tasks):
        torch.testing.assert_close(
            recover_module(fb, fa, i).to_dense(), t.to_dense(), atol=1e-5, rtol=0
        )
    # k = 2 < n: each factor is its projection onto the top-2 directions -> not exact
    fb2, fa2 = fit_module(tasks, 2)
    err = sum(
        float((recover_module(fb2, fa2, i).to_dense() - t.to_dense()).norm())
        for i, t in enumerate(tasks)
    )
    assert err > 1e-3


def test_store_and_recover_adapters(tmp_path):
    dirs = [make_adapter(tmp_path / f"t{i}", seed=i) for i in range(3)]
    store = build_rmm(dirs, 3, tmp_path / "store")
    originals = read_lora_adapters(dirs)
    for i, orig in enumerate(originals):
        out = recover_adapter(store, i, tmp_path / f"rec{i}")
        rec = read_lora_adapters([out])[0]
        for module, f in orig.modules.items():
            torch.testing.assert_close(
                rec.modules[module].to_dense(), f.to_dense(), atol=1e-5, rtol=0
            )
    with pytest.raises(MergeValidationError, match="out of range"):
        recover_adapter(store, 3, tmp_path / "x")
    with pytest.raises(MergeValidationError, match="between 1 and"):
        build_rmm(dirs, 4, tmp_path / "y")
