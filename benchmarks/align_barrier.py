"""By-hand measurement: the loss barrier between two MLPs trained from different seeds, with
plain averaging, after weight matching, and after PLeaS (partial matching + least squares).

    python benchmarks/align_barrier.py [--widths 32,64,128] [--pairs 3] [--steps 150]

The task is the one of tests/merge/test_align_barrier.py (torch only, fixed seeds): x ~ N(0,
I_4), label = argmax of a fixed random teacher tanh(x T₁) T₂ over 4 classes, 1000 training
and 1000 held-out points; students d → w → w → 4 (ReLU), full-batch Adam (lr 1e-2). Pair k
trains from init seeds (2k+1, 2k+2). Barrier = loss(merge) − mean(loss(A), loss(B)); PLeaS
uses the 1000 training inputs (no labels). Prints one row per width: mean over pairs.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from splice.merge.align import align, mlp_spec
from splice.merge.align.pleas import pleas_merge

D, C, N = 4, 4, 1000


def task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    teacher = torch.Generator().manual_seed(0)
    t1, t2 = torch.randn(D, 32, generator=teacher), torch.randn(32, C, generator=teacher)
    x = torch.randn(n, D, generator=torch.Generator().manual_seed(seed))
    return x, (torch.tanh(x @ t1) @ t2).argmax(1)


def forward(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    for k in range(3):
        x = F.linear(x, state[f"fc{k}.weight"], state[f"fc{k}.bias"])
        x = torch.relu(x) if k < 2 else x
    return x


def loss(state: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(forward(state, x), y))


def train(seed: int, width: int, steps: int, x: torch.Tensor, y: torch.Tensor):
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(D, width), torch.nn.Linear(width, width), torch.nn.Linear(width, C)]
    state = {f"fc{k}.{p}": t for k, m in enumerate(layers) for p, t in m.named_parameters()}
    opt = torch.optim.Adam(state.values(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(forward(state, x), y).backward()
        opt.step()
    return {k: v.detach() for k, v in state.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--widths", default="32,64,128")
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--steps", type=int, default=150)
    a = p.parse_args()
    torch.set_num_threads(1)
    x, y = task(N, 1)
    xt, yt = task(N, 2)
    methods = ["average", "weight matching", "PLeaS f=1", "PLeaS f=0.5"]
    print(
        "| width | endpoint loss (train / held-out) | "
        + " | ".join(f"{m} barrier (train / held-out)" for m in methods)
        + " | matching s |"
    )
    print("|---|---|" + "---|" * len(methods) + "---|")
    for width in (int(w) for w in a.widths.split(",")):
        rows: dict[str, list[tuple[float, float]]] = {m: [] for m in methods}
        ends, seconds = [], []
        for k in range(a.pairs):
            sa, sb = train(2 * k + 1, width, a.steps, x, y), train(2 * k + 2, width, a.steps, x, y)
            t0 = time.perf_counter()
            aligned = align(sa, sb, mlp_spec({n: tuple(v.shape) for n, v in sa.items()}))
            seconds.append(time.perf_counter() - t0)
            merges = {
                "average": {n: (sa[n] + sb[n]) / 2 for n in sa},
                "weight matching": {n: (sa[n] + aligned[n]) / 2 for n in sa},
                "PLeaS f=1": pleas_merge(sa, sb, x, merge_fraction=1.0),
                "PLeaS f=0.5": pleas_merge(sa, sb, x, merge_fraction=0.5),
            }
            end = [(loss(sa, *s) + loss(sb, *s)) / 2 for s in ((x, y), (xt, yt))]
            ends.append(end)
            for m, state in merges.items():
                rows[m].append((loss(state, x, y) - end[0], loss(state, xt, yt) - end[1]))

        def mean(pairs: list) -> str:
            return " / ".join(f"{statistics.mean(v[i] for v in pairs):.3f}" for i in (0, 1))

        cells = " | ".join(mean(rows[m]) for m in methods)
        print(f"| {width} | {mean(ends)} | {cells} | {statistics.mean(seconds):.3f} |")


if __name__ == "__main__":
    main()
