"""TSV-C low-rank compression on hand-computed matrices."""

import pytest
import torch

from splice.compress.tsv import compress_delta, compress_tasks, kept_rank, restore_task
from splice.delta import LowRank
from splice.errors import MergeValidationError


def test_rank_k_truncation():
    # δ = diag(5, 3, 1) permuted by rows (σ = 5, 3, 1); k = 2 keeps 5 and 3, drops the 1
    delta = torch.tensor([[0.0, 3.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    c = compress_delta(delta, rank=2)
    assert isinstance(c, LowRank) and c.rank == 2 and c.nbytes == (3 * 2 + 2 * 3) * 4
    # the singular values sit in B's column norms (B = U_k diag(S_k))
    torch.testing.assert_close(c.b.norm(dim=0), torch.tensor([5.0, 3.0]))
    expected = torch.tensor([[0.0, 3.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(c.to_dense(), expected)


def test_kept_rank():
    assert kept_rank((768, 3072), rank=None, fraction=1 / 8) == 96  # ⌊768/8⌋
    assert kept_rank((4, 6), rank=None, fraction=0.1) == 1  # ⌊0.4⌋ = 0 -> at least 1
    assert kept_rank((4, 6), rank=10, fraction=None) == 4
    with pytest.raises(MergeValidationError, match="exactly one of rank and fraction"):
        kept_rank((4, 6), rank=2, fraction=0.5)
    with pytest.raises(MergeValidationError, match=r"fraction = 1\.5 is invalid"):
        kept_rank((4, 6), rank=None, fraction=1.5)


def test_tasks_keep_one_over_t_and_vectors_stay_dense():
    base = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}
    # two tasks, r = 2 -> k = 1 each; task 0: δ = diag(4, 1) -> 4·e1e1ᵀ
    models = [
        {"w": torch.diag(torch.tensor([4.0, 1.0])), "b": torch.tensor([1.0, 2.0])},
        {"w": torch.tensor([[0.0, 2.0], [0.0, 0.0]]), "b": torch.tensor([3.0, 4.0])},
    ]
    comp = compress_tasks(base, models)
    r0, r1 = restore_task(base, comp[0]), restore_task(base, comp[1])
    torch.testing.assert_close(r0["w"], torch.tensor([[4.0, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(r1["w"], torch.tensor([[0.0, 2.0], [0.0, 0.0]]))  # rank 1 already
    assert torch.equal(r0["b"], models[0]["b"]) and torch.equal(r1["b"], models[1]["b"])
    with pytest.raises(MergeValidationError, match="does not have the base's tensors"):
        compress_tasks(base, [{"w": torch.zeros(2, 2)}])
