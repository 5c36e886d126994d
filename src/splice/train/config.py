"""`splice train` configuration: a small strict YAML (unknown keys are errors, and so are
NaN / inf numbers and values outside a field's range, e.g. epochs or lr <= 0).

    model: minilm                 # packaged name (minilm, smollm2), an HF folder, or a .gguf
    task: seq_cls                 # seq_cls (sequence classification) | causal_lm
    data:
      train: bbc_news             # a built-in task (splice data list) or a .jsonl/.csv file
      validation: null            # a file; default: the seeded split of `train`
      test: null                  # a file; default: the seeded split of `train`
      max_train_examples: 2000    # cap (stratified for classification); null: all
      max_eval_examples: 500
    adapter:                      # the adapter method and its parameters (splice adapters;
      method: lora                #   method fusion: AdapterFusion, see splice.train.fusion)
      r: 8
      lora_alpha: 16
      target_modules: [query, value]
    # or a trained gate over frozen experts (splice.compose.mixture_config):
    #   adapter: {method: mixture, experts: {a: out/a, b: out/b}, gate: token, top_k: 2}
    epochs: 1                     # or steps: N (steps wins when both are set)
    lr: 5.0e-4
    batch_size: 16
    max_length: 64                # tokens per example (truncation)
    seed: 0
    weight_decay: 0.0
    warmup_ratio: 0.06            # linear warm-up, then linear decay to 0
    grad_clip: 1.0
    eval_every: 0                 # evaluate on validation every N steps (0: at the end only)
    threads: null                 # torch CPU threads (null: torch's default)

Data formats: classification rows have ``text`` and ``label``; causal-LM rows have
``text`` (loss on every token) or ``prompt`` + ``completion`` (loss on the completion only).
A built-in classification task used for causal LM trains on its texts.
For ``seq_cls`` the classification head is trained in full (added to the adapter's
``modules_to_save`` when the adapter does not list it), as PEFT does for SEQ_CLS.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from splice.config_errors import StrictConfig as _Strict
from splice.config_errors import parse_config
from splice.errors import SpliceError
from splice.io.textfile import load_yaml


class TrainConfigError(SpliceError):
    """A training config is invalid."""


class DataConfig(_Strict):
    train: str
    validation: str | None = None
    test: str | None = None
    max_train_examples: int | None = Field(2000, gt=0)
    max_eval_examples: int | None = Field(500, gt=0)


class TrainConfig(_Strict):
    model: str
    task: Literal["seq_cls", "causal_lm"]
    data: DataConfig
    adapter: dict[str, Any] = Field(default_factory=lambda: {"method": "lora"})
    epochs: float | None = Field(1.0, gt=0)
    steps: int | None = Field(None, gt=0)
    lr: float = Field(5e-4, gt=0)
    batch_size: int = Field(16, gt=0)
    max_length: int = Field(64, gt=1)
    seed: int = 0
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    grad_clip: float | None = Field(1.0, gt=0)
    eval_every: int = Field(0, ge=0)
    threads: int | None = Field(None, gt=0)

    @property
    def method(self) -> str:
        return str(self.adapter.get("method", "lora"))

    @property
    def adapter_params(self) -> dict[str, Any]:
        return {k: v for k, v in self.adapter.items() if k != "method"}


def parse_train_config(data: Any, where: str = "train config") -> TrainConfig:
    cfg = parse_config(TrainConfig, data, where, TrainConfigError, list_valid=False)
    if cfg.method == "fusion":  # AdapterFusion over frozen adapters (splice.train.fusion)
        from splice.train.fusion import fusion_settings

        fusion_settings(cfg.adapter, where=f"{where}: adapter")
        return cfg
    from splice.adapters import make_config
    from splice.compose.mixture_io import mixture_config_of

    if not mixture_config_of(cfg.method, cfg.adapter_params, f"{where}: adapter"):
        make_config(cfg.method, cfg.adapter_params, where=f"{where}: adapter")  # validate early
    return cfg


def load_train_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    p = Path(path)
    if not p.exists():
        raise TrainConfigError(f"{p} does not exist")
    data = load_yaml(p, TrainConfigError)  # one-line errors (splice.io.textfile)
    if data is not None and not isinstance(data, dict):
        raise TrainConfigError(f"{p}: expected a mapping at the top level")
    return parse_train_config(merge_overrides(data or {}, overrides or {}), where=str(p))


def merge_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Apply dotted overrides (``{"data.train": "x.csv", "adapter.r": 4}``) to ``data``."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for key, value in overrides.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise TrainConfigError(f"override {key}: '{part}' is not a mapping")
        node[leaf] = value
    return out
