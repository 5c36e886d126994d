import torch

from splice.merge import MergeContext, get_method


def run(name, base, tensors, ctx=None, **params):
    """Call a registered method on copies of the inputs (methods work in place)."""
    base = None if base is None else torch.as_tensor(base, dtype=torch.float32).clone()
    tensors = [torch.as_tensor(t, dtype=torch.float32).clone() for t in tensors]
    return get_method(name)(base, tensors, ctx or MergeContext(), **params)


MERGEKIT = MergeContext(dialect="mergekit")
