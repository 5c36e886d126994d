"""By-hand check: LoRA `svd` merge in factor form vs the dense SVD PEFT does, and extraction.

    python benchmarks/lora_merge_speed.py [--out 2048] [--in 8192] [--rank 16] [--n 4]

Prints wall times and the max difference between the two rank-r results (same up to
rounding: both are the truncated SVD of Σ w_i s_i B_i A_i), and for extraction the
relative error of `torch.svd_lowrank` (oversample 10, niter 2) vs the exact optimum.
"""

import argparse
import time

import torch

from splice.lora_merge import LoraFactors, LoraMergeOptions, get_lora_method
from splice.lora_merge.extract import lowrank_delta


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=int, default=2048)
    p.add_argument("--in", dest="inp", type=int, default=8192)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--n", type=int, default=4)
    a = p.parse_args()
    g = torch.Generator().manual_seed(0)
    loras = [
        LoraFactors(
            torch.randn(a.out, a.rank, generator=g), torch.randn(a.rank, a.inp, generator=g)
        )
        for _ in range(a.n)
    ]
    t = time.perf_counter()
    fac = get_lora_method("svd")(loras, opts=LoraMergeOptions(rank=a.rank))
    t_fac = time.perf_counter() - t
    t = time.perf_counter()
    dense = sum(f.dense() for f in loras)
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    ref = (u[:, : a.rank] * s[: a.rank]) @ vh[: a.rank]
    t_dense = time.perf_counter() - t
    diff = float((fac.dense() - ref).abs().max()) / float(ref.abs().max())
    print(
        f"svd merge {a.n}x rank {a.rank} on {a.out}x{a.inp}: factor form {t_fac:.3f} s, "
        f"dense SVD {t_dense:.3f} s, max relative difference {diff:.2e}"
    )
    noisy = dense + 0.01 * torch.randn(a.out, a.inp, generator=g) * float(dense.std())
    t = time.perf_counter()
    _, err = lowrank_delta(noisy, rank=a.rank * a.n)
    t_rand = time.perf_counter() - t
    s_all = torch.linalg.svdvals(noisy.double())
    k = a.rank * a.n
    best = float((s_all[k:] ** 2).sum().sqrt() / (s_all**2).sum().sqrt())
    print(
        f"extract rank {k}: svd_lowrank {t_rand:.3f} s, relative error {err:.4e} "
        f"(optimal {best:.4e})"
    )


if __name__ == "__main__":
    main()
