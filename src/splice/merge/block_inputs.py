"""Each block's inputs, cached and pushed forward one merged block at a time.

RegMean++ (`splice.merge.regmean_plusplus`) needs, for block l and candidate i, the inputs
block l receives when the merged blocks 0..l−1 run on candidate i's data. Running the merged
model from the start for every block costs about L²/2 block forwards per batch for L blocks.
When the model is a *chain* (block l+1's hidden-state input is block l's hidden-state output
and nothing runs in between, as in BERT's ``encoder.layer`` and Llama's ``model.layers``),
the inputs can instead be cached once and advanced through each merged block as it is
merged: 2L block forwards per batch (the candidate's block for the Grams, the merged block
to advance), as the authors' code does.

What is cached, per candidate and batch: the current hidden states, and per block the rest
of the call (positional arguments after the hidden states, keyword arguments: attention
masks, rotary embeddings, per-layer-type masks), captured by pre-hooks in one forward of
the merged model. Two things are changed when replaying a call: a key/value cache argument
(an instance of transformers' ``Cache``) is replaced by ``None`` and ``use_cache`` by
``False``, so replaying a block never appends to a cache; with no earlier tokens that
changes nothing in the outputs.

The chain is checked, not assumed: during the capture forward each block's hidden-state
input must equal the previous block's hidden-state output, and replaying every block of the
first batch from the cache must reproduce what the forward computed (to float tolerance).
If either fails, `capture` returns ``None`` and the caller recomputes from the start.
Memory: one hidden-state tensor per batch and candidate (the batch's positions × width),
and per block the references to its call's other arguments (usually the same few tensors
for every block).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


class _Stop(Exception):
    """Raised after the last block: the capture forward needs nothing beyond it."""


@dataclass
class _Call:
    """One block call with its hidden states taken out: ``args[at]`` (``at`` ≥ 0) or
    ``kwargs[key]``."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    at: int
    key: str | None

    def with_hidden(self, hidden: Tensor) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if self.key is not None:
            return self.args, {**self.kwargs, self.key: hidden}
        return (*self.args[: self.at], hidden, *self.args[self.at :]), self.kwargs


def hidden_of(output: Any) -> Tensor:
    """A block's hidden-state output: the tensor itself, or the first element of a tuple."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"block output of type {type(output).__name__} holds no hidden states")


def _split(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Tensor, _Call]:
    if args and isinstance(args[0], Tensor):
        return args[0], _Call(args[1:], _no_cache(kwargs), 0, None)
    if isinstance(kwargs.get("hidden_states"), Tensor):
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        return kwargs["hidden_states"], _Call(args, _no_cache(rest), -1, "hidden_states")
    raise TypeError("the block's first argument is not a tensor of hidden states")


def _no_cache(kwargs: dict[str, Any]) -> dict[str, Any]:
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # no transformers: nothing to strip
        return dict(kwargs)
    out = {k: (None if isinstance(v, Cache) else v) for k, v in kwargs.items()}
    if "use_cache" in out:
        out["use_cache"] = False
    return out


class BlockInputs:
    """Candidate i's batches as block-l inputs: ``hidden[i][b]`` and ``calls[i][b][l]``."""

    def __init__(self, hidden: list[list[Tensor]], calls: list[list[list[_Call]]]) -> None:
        self.hidden = hidden
        self.calls = calls

    @classmethod
    def capture(
        cls,
        merged_model: nn.Module,
        blocks: nn.ModuleList,
        batches: Sequence[Sequence[Any]],
        forward: Callable[[nn.Module, Any], Any],
    ) -> BlockInputs | None:
        """Run each batch of each candidate once through ``merged_model`` (whose block list
        is ``blocks``) and keep block 0's hidden states and every block's call; ``None``
        when the blocks do not form a chain (see the module docstring)."""
        hidden: list[list[Tensor]] = []
        calls: list[list[list[_Call]]] = []
        for i, candidate in enumerate(batches):
            hidden.append([])
            calls.append([])
            for b, batch in enumerate(candidate):
                first, per_block, chained, outs = _capture_one(merged_model, blocks, batch, forward)
                if not chained:
                    return None
                if i == 0 and b == 0 and not _replays(blocks, first, per_block, outs):
                    return None
                hidden[i].append(first)
                calls[i].append(per_block)
        return cls(hidden, calls)

    def run(self, block: nn.Module, layer: int, candidate: int) -> int:
        """Call ``block`` on candidate ``candidate``'s block-``layer`` inputs, batch by batch
        (its hooks see them); the number of batches."""
        with torch.no_grad():
            for h, calls in zip(self.hidden[candidate], self.calls[candidate], strict=True):
                args, kwargs = calls[layer].with_hidden(h)
                block(*args, **kwargs)
        return len(self.hidden[candidate])

    def advance(self, merged_block: nn.Module, layer: int) -> None:
        """Replace every cached hidden state by ``merged_block``'s output on it: the inputs
        of block ``layer`` + 1."""
        with torch.no_grad():
            for hs, calls in zip(self.hidden, self.calls, strict=True):
                for b, h in enumerate(hs):
                    args, kwargs = calls[b][layer].with_hidden(h)
                    hs[b] = hidden_of(merged_block(*args, **kwargs)).detach()


def _capture_one(
    model: nn.Module, blocks: nn.ModuleList, batch: Any, forward: Callable[[nn.Module, Any], Any]
) -> tuple[Tensor, list[_Call], bool, list[Tensor]]:
    ins: list[Tensor] = []
    outs: list[Tensor] = []
    per_block: list[_Call] = []
    last = len(blocks) - 1

    def pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        h, call = _split(args, kwargs)
        ins.append(h.detach())
        per_block.append(call)

    def post(module: nn.Module, args: Any, output: Any) -> None:
        outs.append(hidden_of(output).detach())
        if len(outs) == last + 1:
            raise _Stop

    handles = [b.register_forward_pre_hook(pre, with_kwargs=True) for b in blocks]
    handles += [b.register_forward_hook(post) for b in blocks]
    try:
        with torch.no_grad():
            forward(model, batch)
    except _Stop:
        pass
    except TypeError:  # a block call without tensor hidden states: not a chain we can cache
        return torch.empty(0), [], False, []
    finally:
        for h in handles:
            h.remove()
    chained = len(ins) == len(blocks) == len(outs) and all(
        ins[k + 1] is outs[k] or torch.equal(ins[k + 1], outs[k]) for k in range(last)
    )
    return (ins[0] if ins else torch.empty(0)), per_block, chained, outs


def _replays(blocks: nn.ModuleList, first: Tensor, calls: list[_Call], outs: list[Tensor]) -> bool:
    """Whether replaying the cached calls block after block gives the forward's outputs."""
    h = first
    with torch.no_grad():
        for block, call, expected in zip(blocks, calls, outs, strict=True):
            args, kwargs = call.with_hidden(h)
            try:
                h = hidden_of(block(*args, **kwargs))
            except (RuntimeError, TypeError, ValueError):  # the call needs what was stripped
                return False
            if h.shape != expected.shape or not torch.allclose(h, expected, rtol=1e-4, atol=1e-5):
                return False
    return True
