"""`splice train`: train an adapter from a YAML config and/or flags (flags win)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from splice.commands._flags import add_overwrite_argument

FLAG_KEYS = {
    "model": "model",
    "task": "task",
    "data": "data.train",
    "validation": "data.validation",
    "test": "data.test",
    "max_train_examples": "data.max_train_examples",
    "method": "adapter.method",
    "epochs": "epochs",
    "steps": "steps",
    "lr": "lr",
    "batch_size": "batch_size",
    "max_length": "max_length",
    "seed": "seed",
    "threads": "threads",
}


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Flags as dotted config keys. A ``--param KEY=VALUE`` value is YAML; a value that does
    not parse is an error naming the parameter."""
    from splice.config_errors import named_paths
    from splice.io.textfile import parse_yaml
    from splice.train import TrainConfigError

    out: dict[str, Any] = {}
    for flag, key in FLAG_KEYS.items():
        value = getattr(args, flag)
        if value is not None:
            out[key] = value
    if args.steps is not None and args.epochs is None:
        out["epochs"] = None
    # frozen adapters of --method mixture / fusion
    for name, path in named_paths(args.expert or [], "--expert", TrainConfigError).items():
        if "." in name:  # the name becomes a dotted config key
            raise TrainConfigError(f"--expert {name!r}: a name without '.'")
        out[f"adapter.experts.{name}"] = path
    for item in args.param or []:
        if "=" not in item:
            raise TrainConfigError(f"--param {item!r}: expected KEY=VALUE (e.g. r=8)")
        k, v = item.split("=", 1)
        out[f"adapter.{k}"] = parse_yaml(v, f"--param {k}", TrainConfigError)
    return out


def _run(args: argparse.Namespace) -> int:
    from splice.train import load_train_config, parse_train_config, run_training
    from splice.train.config import merge_overrides

    overrides = _overrides(args)
    if args.config:
        cfg = load_train_config(args.config, overrides)
    else:
        cfg = parse_train_config(merge_overrides({}, overrides), where="flags")
    result = run_training(cfg, args.out, overwrite=args.overwrite, progress=not args.quiet)
    print(f"trainable params: {result.trainable_params:,} of {result.total_params:,}")
    test = result.after["test"]
    if result.task == "seq_cls":
        acc, f1, n = test["accuracy"], test["macro_f1"], test["examples"]
        print(f"test accuracy {acc:.4f}  macro-F1 {f1:.4f}  ({n} examples)")
    else:
        before = result.before["test"]["loss"]
        print(f"held-out loss {before:.4f} -> {test['loss']:.4f} (base -> adapted)")
    kind = cfg.method if cfg.method in ("mixture", "fusion") else "adapter"
    print(f"{kind} written to {args.out}")
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train an adapter (LoRA, DoRA, IA3, ...) from YAML or flags")
    p.add_argument(
        "config",
        nargs="?",
        help="training config YAML (see splice.train.config); flags override it",
    )
    p.add_argument("--out", required=True, help="output folder (a PEFT adapter folder + logs)")
    p.add_argument("--model", help="minilm, smollm2, an HF folder or a .gguf file")
    p.add_argument("--task", choices=["seq_cls", "causal_lm"])
    p.add_argument("--data", help="training data: a built-in task name or a .jsonl/.csv file")
    p.add_argument("--validation", help="validation file (default: a split of --data)")
    p.add_argument("--test", help="test file (default: a split of --data)")
    p.add_argument("--max-train-examples", type=int)
    p.add_argument(
        "--method",
        help="adapter method (lora, dora via lora use_dora=true, ia3, ...); over frozen --expert "
        "adapters: mixture (a trained gate; --param gate=token|sequence, top_k=2, "
        "balance_coef=0.01) or fusion (AdapterFusion)",
    )
    p.add_argument(
        "--expert",
        action="append",
        metavar="NAME=PATH",
        help="--method mixture / fusion: a frozen adapter folder under a name, repeatable",
    )
    p.add_argument(
        "--param", action="append", metavar="KEY=VALUE", help="adapter parameter, repeatable"
    )
    p.add_argument("--epochs", type=float)
    p.add_argument("--steps", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-length", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int)
    add_overwrite_argument(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print all results as JSON")
    p.set_defaults(fn=_run)
