"""Training adapters: `splice train` and a lean loop usable from Python.

from splice.train import TrainConfig, run_training, fit
"""

from splice.train.config import TrainConfig, TrainConfigError, load_train_config, parse_train_config
from splice.train.loop import evaluate_classification, evaluate_lm, fit
from splice.train.run import TrainResult, run_training

__all__ = [
    "TrainConfig",
    "TrainConfigError",
    "TrainResult",
    "evaluate_classification",
    "evaluate_lm",
    "fit",
    "load_train_config",
    "parse_train_config",
    "run_training",
]
