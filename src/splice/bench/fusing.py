"""The ``fusion`` composition row of `splice bench`: AdapterFusion over the frozen LoRA experts.

Pfeiffer et al. 2021's second stage (`splice.compose.fusion`; what ``splice train --method
fusion`` trains): for each target task m, one fusion Ψ_m over *all* the experts' adapters,
trained on m's training data with m's head, evaluated on m. At every adapted layer, with y the
layer's output and r_i = ΔW_i x the i-th LoRA's update:

    out = y + Σ_i p_i V r_i,   p = softmax_i((Q y) · (K r_i))

The adapters and the backbone are frozen; Ψ_m (Q, K, V per adapted layer; AdapterHub's
"dynamic" init: Q, K ~ N(0, 0.02²), V ≈ I) trains at ``fusion.lr`` and m's head, starting from
m's LoRA expert's head, at ``fusion.head_lr`` (default ``training.head_lr``), for
``fusion.epochs`` passes over m's training split (default ``training.epochs``; batches, warm-up
and decay as the experts). The loss adds ``fusion.regularization`` · Σ_layers ‖I − V‖²_F. The
model is in training mode while the fusion trains (the backbone's dropout on), as AdapterHub's
fusion training. The task id selects the fusion and head at inference (as the merge rows' heads
and LoraHub's per-task composition): the row is one fusion per task, each on its own test split.

With Q = K = 0 every p_i = 1/N, so with V = I the fused layer is y + (1/N) Σ_i ΔW_i x, the
uniform mixed-adapter average (the tests check this against the routed model's forward).

Cached as the experts are (`splice.bench.cache`): one folder per task, keyed as the gate's
(`splice.bench.gating.composition_key`) plus the target task and the fusion settings, holding
the fusion folder (`splice.compose.fusion_io`, the task's trained head included: what ``splice
train --method fusion`` writes for a classifier) and ``meta.json``.
"""

from __future__ import annotations

import json
import time
from typing import Any

import torch

from splice.bench.backbone import State, TaskHeads, head_of
from splice.bench.cache import bench_root
from splice.bench.config import BenchConfig
from splice.bench.experts import Expert, mixed_batches
from splice.bench.gating import _WithAuxLoss, composition_key, train_steps
from splice.bench.routing import RoutedModel, RoutedResult
from splice.compose.blocks import Fuse
from splice.compose.fusion import FusionConfig, add_fusion
from splice.compose.fusion_io import load_fusion, write_fusion_files
from splice.io.output_folder import cache_folder


def fusion_block(routed: RoutedModel, task: str) -> Fuse:
    """Task ``task``'s fusion over every expert's adapter (the model's adapter names)."""
    index = list(routed.adapter).index(task)
    return Fuse(*routed.adapter.values(), name=f"fusion{index}")


def get_fusion(
    routed: RoutedModel,
    pool: dict[str, Expert],
    heads: dict[str, State],
    cfg: BenchConfig,
    task: str,
    progress: bool = True,
) -> tuple[Fuse, State, dict[str, Any]]:
    """Task ``task``'s cached fusion on ``routed.am`` (trained on a miss), its head and its meta
    (``cached``: whether it was read from the cache)."""
    f, t = cfg.fusion, cfg.training
    settings = {
        "target": task,
        "lr": f.lr,
        "head_lr": f.head_lr or t.head_lr,
        "epochs": f.epochs or t.epochs,
        "regularization": f.regularization,
    }
    key = composition_key(routed, pool, cfg, {"fusion": settings})
    folder = bench_root() / "fusions" / f"fusion-{task}-{key[:16]}"
    block = fusion_block(routed, task)
    if (folder / "meta.json").is_file():
        # a template of the task's head in place, which load_fusion fills with the saved one
        setattr(routed.model, routed.ev.base.head_name, routed.ev.head_module(task, heads[task]))
        load_fusion(routed.am, folder, load_adapters=False, activate=False)
        meta = json.loads((folder / "meta.json").read_text())
        return block, _head_state(routed), {**meta, "cached": True}
    from splice.train.loop import fit

    torch.manual_seed(t.seed)
    fusion = add_fusion(routed.am, block, FusionConfig(regularization=f.regularization))
    head = routed.ev.head_module(task, heads[task])
    for p in head.parameters():
        p.requires_grad_(True)
    net = TaskHeads(
        routed.am, routed.model, routed.ev.base.head_name, {task: head}, routed.ev.precision
    )

    def penalty() -> torch.Tensor | None:
        return fusion.regularization_loss() if f.regularization else None

    data = [routed.ev.tasks[task]]
    start = time.perf_counter()
    routed.am.set_active(block)
    try:
        with cache_folder(folder) as tmp:
            summary = fit(
                _WithAuxLoss(net, penalty),
                lambda epoch: mixed_batches(data, routed.ev.base.tokenizer, cfg, epoch),
                train_steps(data, t.batch_size, settings["epochs"]),
                lr=f.lr,
                weight_decay=t.weight_decay,
                warmup_ratio=t.warmup_ratio,
                grad_clip=t.grad_clip,
                param_groups=[
                    {"params": list(fusion.parameters()), "lr": f.lr},
                    {"params": list(head.parameters()), "lr": settings["head_lr"]},
                ],
                progress=progress,
            )
            head_name = routed.ev.base.head_name  # TaskHeads put the task's head there
            write_fusion_files(routed.am, block.name, tmp, head=head_name)
            head_state = _head_state(routed)
            meta = {"key": key, **settings, **summary.record()}
            meta["seconds_total"] = round(time.perf_counter() - start, 2)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    finally:
        routed.am.set_active([])
        routed.am.eval()
    return block, head_state, {**meta, "cached": False}


def _head_state(routed: RoutedModel) -> State:
    head = head_of(routed.model, routed.ev.base.head_name)
    return {k: v.detach().clone() for k, v in head.state_dict().items()}


def fusion_result(routed: RoutedModel, fused: dict[str, tuple[Fuse, State]]) -> RoutedResult:
    """Each task's test split through its own fusion (``fused``: task -> (Fuse, head))."""
    routed.am.eval()
    test, seconds = {}, 0.0
    for task, (block, head) in fused.items():
        routed.am.set_active(block)
        try:
            enc = routed.ev.encoded[(task, "test")]
            start = time.perf_counter()
            feats = [routed.features(b, None) for b in enc.batches]
            seconds += time.perf_counter() - start
        finally:
            routed.am.set_active([])
        test[task] = routed.ev.accuracy(task, "test", feats, head)
    return RoutedResult(test, seconds)


def fusion_note(metas: list[dict[str, Any]]) -> str:
    secs = sum(float(m.get("train_seconds") or 0) for m in metas)
    steps = sum(int(m.get("steps") or 0) for m in metas)
    cached = sum(bool(m.get("cached")) for m in metas)
    return (
        f"one fusion per task over all {len(metas)} adapters, trained with its head on its "
        f"task's training data: {steps} steps, {secs:.1f} s in all ({cached} of {len(metas)} "
        "from the cache); the task id picks the fusion"
    )
