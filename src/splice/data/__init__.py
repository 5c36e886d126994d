"""Labeled text data: built-in real tasks and user files, seeded splits, metrics.

from splice.data import load_task, make_splits, accuracy
ds = load_task("bbc_news")                       # or "my_data.csv" / "my_data.jsonl"
splits = make_splits(ds, seed=0, sizes=(0.8, 0.1, 0.1), max_per_class={"train": 64})
splits.save("splits/bbc_news-seed0.json", ds)
parts = load_splits("splits/bbc_news-seed0.json", ds).apply(ds)   # checks the hash
"""

from splice.data.dataset import (
    SourceMissingError,
    TextClassificationDataset,
    default_cache_dir,
)
from splice.data.metrics import (
    accuracy,
    macro_f1,
    mean_normalized_accuracy,
    normalized_accuracy,
    per_class_f1,
)
from splice.data.registry import TASKS, TaskSpec, get_task, load_task
from splice.data.splits import SPLIT_NAMES, Splits, load_splits, make_splits
from splice.data.user_file import load_user_file

__all__ = [
    "SPLIT_NAMES",
    "TASKS",
    "SourceMissingError",
    "Splits",
    "TaskSpec",
    "TextClassificationDataset",
    "accuracy",
    "default_cache_dir",
    "get_task",
    "load_splits",
    "load_task",
    "load_user_file",
    "macro_f1",
    "make_splits",
    "mean_normalized_accuracy",
    "normalized_accuracy",
    "per_class_f1",
]
