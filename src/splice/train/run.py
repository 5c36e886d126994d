"""`splice train`: load model and data, inject the adapter, train, evaluate, save.

The output folder is a PEFT adapter folder (``adapter_config.json`` +
``adapter_model.safetensors``, loadable by PEFT and by splice); over frozen experts, for
``method: mixture`` a mixture folder (`splice.compose.mixture_io`: the trained gate) and for
``method: fusion`` a fusion folder (`splice.train.fusion`, `splice.compose.fusion_io`); plus:

    train_log.jsonl      one JSON record per step (loss, lr, elapsed) and per evaluation
    eval.json            metrics before and after training, on validation and test
    splice_train.yaml    the resolved config
    splits.json          the classification splits (indices + data hash), to reproduce

It is written through `splice.io.output_folder.OutputFolder`: the location and the overwrite
rule are checked before any loading, the folder is built in ``<out>.splice-partial`` under a
lock (a second run into the same ``--out`` is refused) and renamed into place when complete;
its files get at most the permissions of the model and data files.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from splice.io.output_folder import OutputFolder
from splice.train.config import TrainConfig
from splice.train.loop import FitResult

Metrics = dict[str, dict[str, float]]  # split -> metric -> value


@dataclass(frozen=True)
class TrainResult:
    """One training run: what was trained, how, and its metrics (``before``: the base model's,
    causal LM only; ``label_names``: classification only)."""

    model: str
    model_folder: str
    task: str
    method: str
    trainable_params: int
    total_params: int
    train_examples: int
    fit: FitResult
    after: Metrics
    before: Metrics | None = None
    label_names: list[str] | None = None

    def to_json(self) -> dict[str, Any]:
        """eval.json's content."""
        fit = self.fit.record()
        out: dict[str, Any] = {
            "model": self.model,
            "model_folder": self.model_folder,
            "task": self.task,
            "method": self.method,
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "train_examples": self.train_examples,
            "steps": fit.pop("steps"),
        }
        if self.before is not None:
            out["before"] = self.before
        out.update(fit)
        out["after"] = self.after
        if self.label_names:
            out["label_names"] = self.label_names
        return out


def run_training(
    cfg: TrainConfig,
    out: str | os.PathLike[str],
    *,
    overwrite: int | bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train, evaluate and write the output folder (``overwrite``: 1 replaces a previous
    splice output, 2 any folder)."""
    from splice.adapters import AdapterModel, make_config
    from splice.adapters.peft_format import save_adapter_files
    from splice.compose.fusion_io import write_fusion_files
    from splice.compose.mixture_io import build_mixture, mixture_config_of, write_mixture_files
    from splice.train import data as D
    from splice.train.fusion import RegularizedFusion, fusion_settings, setup_fusion
    from splice.train.loop import evaluate_classification, evaluate_lm, fit
    from splice.train.models import head_names, load_for_task

    out = Path(out)
    sources = [cfg.model, cfg.data.train, cfg.data.validation, cfg.data.test]
    # over frozen experts (splice.compose): "mixture" trains a gate, "fusion" AdapterFusion
    mixture_cfg = mixture_config_of(cfg.method, cfg.adapter_params)
    fusion_cfg = fusion_settings(cfg.adapter) if cfg.method == "fusion" else None
    adapter_cfg = None
    if mixture_cfg is None and fusion_cfg is None:
        adapter_cfg = make_config(cfg.method, cfg.adapter_params, where="adapter")
    experts = (mixture_cfg or fusion_cfg).experts if (mixture_cfg or fusion_cfg) else {}
    sources += list(experts.values())
    folder = OutputFolder(out, overwrite=overwrite, inputs=[s for s in sources if s]).check()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.task == "seq_cls":
        cls = D.classification_splits(cfg)
        parts, label_names = cls["parts"], list(cls["dataset"].label_names)
    else:
        cls, parts, label_names = None, D.lm_splits(cfg), []
    n_train = len(parts["train"])
    with folder as partial:
        torch.manual_seed(cfg.seed)
        model, tok, model_folder = load_for_task(
            cfg.model, cfg.task, len(label_names) or None, label_names or None
        )
        if cfg.task == "seq_cls" and adapter_cfg and not adapter_cfg.modules_to_save:
            adapter_cfg = adapter_cfg.model_copy(update={"modules_to_save": head_names(model)})
        am = AdapterModel(model)
        # trained: what the optimizer steps through; evaluated: what the metrics run
        trained: Any = am
        head = None  # a classifier's head trained with a fusion
        if mixture_cfg:
            trained = build_mixture(am, mixture_cfg)  # loads the experts; only the gate trains
        elif fusion_cfg:
            # loads the adapters; only the fusion trains (and a classifier's new head)
            head = head_names(model)[0] if cls is not None and head_names(model) else None
            fusion = setup_fusion(am, fusion_cfg, head)
            trained = RegularizedFusion(am, fusion)
        else:
            am.add_adapter("default", adapter_cfg)
        evaluated = am if fusion_cfg else trained
        trainable, total = evaluated.trainable_parameters()

        score = evaluate_classification if cls is not None else evaluate_lm

        def batches(split: str, seed: int | None = None):
            if cls is None:
                return D.lm_batches(parts[split], tok, cfg.batch_size, cfg.max_length, seed)
            p = parts[split]
            return D.cls_batches(p.texts, p.labels, tok, cfg.batch_size, cfg.max_length, seed)

        def evaluate(split: str) -> dict[str, float]:
            return score(evaluated, batches(split))

        steps_per_epoch = math.ceil(n_train / cfg.batch_size)
        total_steps = cfg.steps or max(1, math.ceil((cfg.epochs or 1.0) * steps_per_epoch))
        before = None
        if cfg.task == "causal_lm":
            with am.disabled():
                before = {"test": evaluate("test")}
        log_path = partial / "train_log.jsonl"
        with open(log_path, "w") as log_file:

            def log(record: dict[str, Any]) -> None:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()

            summary = fit(
                trained,
                lambda epoch: batches("train", cfg.seed + epoch),
                total_steps,
                lr=cfg.lr,
                weight_decay=cfg.weight_decay,
                warmup_ratio=cfg.warmup_ratio,
                grad_clip=cfg.grad_clip,
                log=log,
                evaluate=lambda: evaluate("validation"),
                eval_every=cfg.eval_every,
                progress=progress,
            )
            after = {"validation": evaluate("validation"), "test": evaluate("test")}
            log({"final": after})
        result = TrainResult(
            cfg.model,
            str(model_folder),
            cfg.task,
            cfg.method,
            trainable,
            total,
            n_train,
            summary,
            after,
            before,
            label_names or None,
        )
        if mixture_cfg:
            write_mixture_files(trained, partial, mixture_cfg.experts)
        elif fusion_cfg:
            name = fusion_cfg.block().name
            write_fusion_files(
                am, name, partial, base_model_name_or_path=str(model_folder), head=head
            )
        else:
            save_adapter_files(am, partial, base_model_name_or_path=str(model_folder))
        (partial / "eval.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")
        (partial / "splice_train.yaml").write_text(
            yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
        )
        if cls is not None:
            cls["splits"].save(partial / "splits.json", cls["dataset"])
    return result
