"""Deterministic k-means (Lloyd's algorithm with k-means++ seeding) on the rows of a matrix.

Seeding: the first centre is a row drawn uniformly with `generator`, each next one a row drawn
with probability ∝ its squared distance to the nearest centre (k-means++, Arthur &
Vassilvitskii 2007). Lloyd iterations until the assignment stops changing (at most `iters`).
An empty cluster takes the row farthest from its current centre. Ties in the assignment go to
the lower cluster index (torch.argmin). float64 throughout.
"""

from __future__ import annotations

import torch


def kmeans(
    x: torch.Tensor, k: int, generator: torch.Generator, iters: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels: n, centres: k×d) of the rows of x (n×d), k <= n."""
    x = x.double()
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k = {k} must be between 1 and the number of rows {n}")
    first = int(torch.randint(n, (1,), generator=generator))
    centres = [x[first]]
    d2 = ((x - x[first]) ** 2).sum(1)
    for _ in range(1, k):
        total = float(d2.sum())
        if total <= 0:
            idx = int(torch.randint(n, (1,), generator=generator))
        else:
            idx = int(torch.multinomial(d2 / total, 1, generator=generator))
        centres.append(x[idx])
        d2 = torch.minimum(d2, ((x - x[idx]) ** 2).sum(1))
    c = torch.stack(centres)
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iters):
        new = torch.cdist(x, c).argmin(1)
        for j in range(k):
            if not bool((new == j).any()):
                far = int(((x - c[new]) ** 2).sum(1).argmax())
                new[far] = j
        if torch.equal(new, labels):
            break
        labels = new
        c = torch.stack([x[labels == j].mean(0) for j in range(k)])
    return labels, c
