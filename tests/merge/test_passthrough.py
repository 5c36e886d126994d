import torch
from merge_test_util import run


def test_returns_input():
    out = run("passthrough", None, [[1.0, -2.0, 3.5]])
    assert torch.equal(out, torch.tensor([1.0, -2.0, 3.5]))


def test_scale():
    out = run("passthrough", None, [[1.0, -2.0, 3.5]], scale=0.5)
    assert torch.equal(out, torch.tensor([0.5, -1.0, 1.75]))
    out = run("passthrough", None, [[1.0, -2.0]], scale=[0.0])
    assert torch.equal(out, torch.tensor([0.0, -0.0]))
