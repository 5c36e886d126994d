#!/usr/bin/env python
"""Why AdaMerging's entropy minimization drops some experts on a bench pool: the summed test
entropy and the accuracy of task-arithmetic merges around AdaMerging's starting point.

Run by hand from the repository root with the bench environment (the experts come from the
bench cache; missing ones are trained as `splice bench` would):

    python benchmarks/adamerging_entropy.py benchmarks/bench_8tasks.yaml --kind full
    python benchmarks/adamerging_entropy.py benchmarks/bench_8tasks.yaml --kind lora --delta 0.1

With the base θ0, the experts' task vectors τ_j and λ = (λ_1..λ_T), the merge is
θ(λ) = θ0 + Σ_j λ_j τ_j and task k's entropy H_k(λ) the mean Shannon entropy of its head's
softmax over its whole test split (the inputs AdaMerging trains on; labels only for the
accuracy column). Task-wise AdaMerging descends Σ_k H_k from λ = init (0.3), so

    ∂/∂λ_j Σ_k H_k = ∂H_j/∂λ_j (own) + Σ_{k≠j} ∂H_k/∂λ_j (others)

decides where λ_j goes first: a positive total pushes λ_j down (to the clamp at 0), even
when the own term is negative (more of τ_j makes task j surer and more accurate). Two tables:

1. along each expert's own axis: λ_j ∈ --grid, the others at init: H_j and task j's test
   accuracy (does entropy track accuracy on its own task?);
2. the forward differences (H_k(init + δ e_j) − H_k(init)) / δ: own, others, total.

Results: --out (JSON) and the two tables as markdown on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from splice.bench.backbone import prepare_base
from splice.bench.config import load_bench_config
from splice.bench.evaluate import Evaluator
from splice.bench.precision import resolve_precision
from splice.bench.run import _load, _Runner
from splice.bench.tasks import prepare_task


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", type=Path, help="a splice bench YAML (its experts are used)")
    ap.add_argument("--kind", default="full", help="expert kind of the config (full / lora)")
    ap.add_argument("--init", type=float, default=0.3, help="AdaMerging's starting λ")
    ap.add_argument("--delta", type=float, default=0.1, help="forward-difference step")
    ap.add_argument("--grid", default="0,0.15,0.3,0.6,1.0", help="λ_j values of table 1")
    ap.add_argument("--out", type=Path, default=Path("adamerging_entropy.json"))
    args = ap.parse_args(argv)

    cfg = load_bench_config(args.config)
    if args.kind not in cfg.kinds:
        raise SystemExit(f"splice: error: kind '{args.kind}' is not in the config's {cfg.kinds}")
    tasks = [prepare_task(t, cfg.data) for t in cfg.tasks]
    base = prepare_base(cfg.model, cfg.training.seed)
    precision = resolve_precision(cfg.precision)
    ev = Evaluator(base, tasks, cfg.training.max_length, cfg.eval_batch_size, precision=precision)
    runner = _Runner(cfg, False)
    runner.bar = tqdm(disable=True)
    experts, _ = runner.train_experts(base, tasks)
    pool = list(experts[args.kind].values())
    names = [e.tasks[0] for e in pool]
    heads = {e.tasks[0]: e.heads[e.tasks[0]] for e in pool}
    theta0 = load_file(str(base.folder / "model.safetensors"))
    floating = [n for n, v in theta0.items() if v.is_floating_point()]
    taus = []
    for e in pool:
        state = _load(e)
        taus.append({n: state[n].float() - theta0[n].float() for n in floating})

    def measure(lam: list[float], only: list[str]) -> dict[str, tuple[float, float]]:
        """(mean test entropy, test accuracy) per task of ``only`` for θ(λ)."""
        state = dict(theta0)
        for n in floating:
            state[n] = theta0[n].float() + sum(w * t[n] for w, t in zip(lam, taus, strict=True))
        ev.load_backbone(state)
        out = {}
        for task in only:
            feats = ev.features(ev.encoded[(task, "test")])
            head = ev.head_module(task, heads[task])
            with torch.no_grad():
                logp = torch.cat([head(f) for f in feats]).float().log_softmax(-1)
            entropy = float(-(logp.exp() * logp).sum(-1).mean())
            out[task] = (entropy, ev.accuracy(task, "test", feats, heads[task]))
        return out

    grid = [float(x) for x in args.grid.split(",")]
    t = len(names)
    axis: dict[str, list[tuple[float, float, float]]] = {}
    with tqdm(total=t * len(grid) + t + 1, desc="merges", unit="merge") as bar:
        for j, task in enumerate(names):
            axis[task] = []
            for value in grid:
                lam = [args.init] * t
                lam[j] = value
                h, acc = measure(lam, [task])[task]
                axis[task].append((value, h, acc))
                bar.update()
        at_init = measure([args.init] * t, names)
        bar.update()
        jac = []  # jac[j][k] = ∂H_k/∂λ_j
        for j in range(t):
            lam = [args.init] * t
            lam[j] += args.delta
            moved = measure(lam, names)
            jac.append([(moved[k][0] - at_init[k][0]) / args.delta for k in names])
            bar.update()

    print(f"\n{args.kind} experts: H_j and accuracy of task j along λ_j (others at {args.init})\n")
    print("| task | " + " | ".join(f"λ={v:g}" for v in grid) + " |")
    print("|---|" + "---|" * len(grid))
    for task, points in axis.items():
        cells = " | ".join(f"{h:.2f} / {100 * a:.1f}%" for _, h, a in points)
        print(f"| {task} | {cells} |")
    print(f"\n∂(Σ_k H_k)/∂λ_j at λ = {args.init} (forward difference, δ = {args.delta})\n")
    print("| expert j | own ∂H_j/∂λ_j | others Σ_k≠j | total | descent moves λ_j |")
    print("|---|---|---|---|---|")
    for j, task in enumerate(names):
        own, total = jac[j][j], sum(jac[j])
        move = "down" if total > 0 else "up"
        print(f"| {task} | {own:+.3f} | {total - own:+.3f} | {total:+.3f} | {move} |")
    args.out.write_text(
        json.dumps(
            {
                "config": str(args.config),
                "kind": args.kind,
                "init": args.init,
                "delta": args.delta,
                "tasks": names,
                "axis": axis,
                "entropy_at_init": {k: v[0] for k, v in at_init.items()},
                "accuracy_at_init": {k: v[1] for k, v in at_init.items()},
                "d_entropy": jac,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
