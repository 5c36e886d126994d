"""Dot products and L1 norms over a tensor in row order: the whole-tensor statistics of
SLERP, Model Stock and DARE's L1 rescale (splice dialect), the same bits whether the tensor
is given whole or in row chunks.

For m vectors x_0 … x_{m−1} of one shape, rows along the first dimension (a 0-D tensor is
one row, a 1-D tensor has one entry a row), the Gram matrix G_ij = x_i · x_j is computed as

- each row's partial p_r = Σ_c x_i[r, c] · x_j[r, c], the entries cast to float64 (so a
  product of two 16- or 32-bit values is exact) and the row reduced by torch's serial
  reduction of that row alone (`serial_row_sums`: the same bits whatever the other rows
  and the thread count);
- G_ij = ((p_0 + p_1) + p_2) + … + p_{R−1}: the partials added one at a time in row order,
  in float64 (`numpy.add.accumulate`, strictly sequential), starting from 0.

`RowGram.add` takes the rows in order in any slices (the whole tensor, or the row chunks of
`splice.engine.chunks`, whose statistics pre-pass answers `TensorGram` this way) and gives
the same bits. The rows are converted ``ROW_BLOCK`` entries at a time, so the float64
scratch is a few blocks (≤ (m + 1) · 8 · 2^16 bytes, at least one row), not a copy of the
tensor. `row_dots` gives the partials themselves (Model Stock's ``scope: row``, one t per
row). `row_abs_sums` gives each row's Σ_c |x[r, c]| the same way (float64, serial), and
`RowOrderSum` adds any per-row partials in row order (DARE's L1 norms before and after its
drop, `RowPartials`).

Cost: m casts to float64 and m(m+1)/2 products and row sums per entry, about the work of
the float32 sums it replaces times two to three, on the statistics only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from splice.merge.reductions import serial_row_sums

ROW_BLOCK = 1 << 16  # entries converted to float64 at a time (at least one row)


def _rows(x: Tensor) -> Tensor:
    """``x`` as 2-D [rows, entries a row]: rows along the first dimension."""
    return x.reshape(1, -1) if x.dim() == 0 else x.reshape(x.shape[0], -1)


def row_dots(xs: Sequence[Tensor]) -> Tensor:
    """The per-row partials [rows, m, m] (float64, symmetric) of the m vectors ``xs`` (one
    shape; rows along the first dimension): entry [r, i, j] = Σ_c x_i[r, c] · x_j[r, c]."""
    rows = [_rows(x) for x in xs]
    m, (n_rows, cols) = len(rows), rows[0].shape
    out = torch.empty((n_rows, m, m), dtype=torch.float64)
    step = max(1, ROW_BLOCK // max(cols, 1))
    for a in range(0, n_rows, step):
        b = min(n_rows, a + step)
        block = [r[a:b].to(torch.float64) for r in rows]
        product = torch.empty_like(block[0])
        for i in range(m):
            for j in range(i, m):
                torch.mul(block[i], block[j], out=product)
                out[a:b, i, j] = out[a:b, j, i] = serial_row_sums(product)
        del block, product
    return out


def row_abs_sums(x: Tensor) -> Tensor:
    """Σ_c |x[r, c]| of each row r (first dimension), float64 [rows]: entries cast to
    float64, each row reduced serially (the same bits whatever the other rows)."""
    rows = _rows(x)
    n_rows, cols = rows.shape
    out = torch.empty(n_rows, dtype=torch.float64)
    step = max(1, ROW_BLOCK // max(cols, 1))
    for a in range(0, n_rows, step):
        out[a : a + step] = serial_row_sums(rows[a : a + step].to(torch.float64).abs_())
    return out


class RowOrderSum:
    """The sum over rows of per-row float64 partials ([rows, ...]), added one at a time in
    row order from 0 (`numpy.add.accumulate`: strictly sequential), fed in row order in any
    slices (`add`)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.total = np.zeros(shape, dtype=np.float64)

    def add(self, partials: Tensor) -> None:
        """Add the partials of the next rows."""
        chain = np.concatenate([self.total[None], partials.to(torch.float64).numpy()])
        self.total = np.add.accumulate(chain, axis=0)[-1]

    def result(self) -> Tensor:
        """The sum so far, float64."""
        return torch.from_numpy(np.array(self.total, dtype=np.float64))


class RowGram:
    """G_ij = x_i · x_j over a tensor fed in row order (`add`): per-row float64 partials
    added one at a time in row order (the module's definition)."""

    def __init__(self, m: int) -> None:
        self.sum = RowOrderSum((m, m))

    def add(self, xs: Sequence[Tensor]) -> None:
        """Add the next rows of the m vectors ``xs`` (one shape, the rows after those added
        so far)."""
        rows = [_rows(x) for x in xs]
        n_rows, cols = rows[0].shape
        step = max(1, ROW_BLOCK // max(cols, 1))
        for a in range(0, n_rows, step):
            self.sum.add(row_dots([r[a : a + step] for r in rows]))

    def gram(self) -> Tensor:
        """The m × m Gram matrix so far, float64."""
        return self.sum.result()


def tensor_gram(xs: Sequence[Tensor]) -> Tensor:
    """The m × m Gram matrix (float64) of the whole vectors ``xs`` (`RowGram` in one go)."""
    gram = RowGram(len(xs))
    gram.add(xs)
    return gram.gram()
