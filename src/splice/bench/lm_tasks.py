"""The causal-LM pool's tasks: text domains (held-out loss) and exact-match tasks.

Two kinds:

- ``lm``: a text domain; the expert is trained on its texts (loss on every token, as
  ``splice train`` on ``text`` rows) and scored by the token-weighted mean cross-entropy
  of its held-out texts (`splice.train.loop.evaluate_lm`), lower is better;
- ``exact_match``: prompt / answer pairs; the expert is trained on them (loss on the
  answer only, as ``prompt`` + ``completion`` rows) and scored by greedy decoding of at
  most ``lm.max_new_tokens`` tokens: right when the generated text, cut at the first
  newline and stripped, equals the answer stripped (`bench.lm_evaluate`).

Built-in sources (the classification tasks' offline data, `splice.data`):

    bbc_news             BBC news articles (all five topics)          lm
    spam                 SpamAssassin emails, ham only                 lm
    tweet_sentiment      tweets (all three sentiments)                 lm
    wordnet_glosses      WordNet noun glosses                          lm
    wordnet_category     "Word: dog\\nCategory:" -> " animal"          exact_match

``wordnet_category`` is WordNet's noun supersense as a generative task: the first lemma
of each noun synset, answered by its lexicographer file without ``noun.`` (26 answers);
lemmas with several supersenses (polysemous words) are dropped, so every prompt has one
right answer. A user file works too: ``.txt`` (one text per line), ``.jsonl`` / ``.csv``
/ ``.tsv`` rows with ``text`` (kind lm) or ``prompt`` + ``completion`` (exact_match).

Split: a seeded shuffle (``data.split_seed``) cut 80/10/10, each part capped by
``data.train_max`` / ``validation_max`` / ``test_max`` (examples; the ``*_per_class``
caps are classification settings and do not apply). A task's identity (its experts'
cache key) hashes its examples and the split.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from splice.bench.config import DataSizes
from splice.data.splits import SPLIT_NAMES
from splice.errors import DataError
from splice.train.data import LMExample

TaskKind = Literal["lm", "exact_match"]
DOMAINS = ("bbc_news", "spam", "tweet_sentiment", "wordnet_glosses")
EXACT_MATCH = ("wordnet_category",)
BUILTIN = (*DOMAINS, *EXACT_MATCH)


@dataclass(frozen=True)
class LMTaskData:
    """One LM-pool task: its kind and its three parts."""

    name: str
    ref: str
    kind: TaskKind
    parts: dict[str, list[LMExample]]

    def identity(self) -> dict[str, Any]:
        blob = json.dumps(
            {n: [[e.prompt, e.completion] for e in self.parts[n]] for n in SPLIT_NAMES},
            separators=(",", ":"),
        ).encode()
        return {"kind": self.kind, "examples_hash": hashlib.sha256(blob).hexdigest()}

    def sizes(self) -> dict[str, int]:
        return {n: len(self.parts[n]) for n in SPLIT_NAMES}


def _texts(name: str) -> list[str]:
    from splice.data import load_task

    if name == "wordnet_glosses":
        return list(load_task("wordnet_supersense").texts)
    ds = load_task(name)
    if name == "spam":
        ham = ds.label_names.index("ham")
        return [t for t, y in zip(ds.texts, ds.labels, strict=True) if y == ham]
    return list(ds.texts)


def category_pairs() -> list[LMExample]:
    """``wordnet_category``'s (prompt, answer) pairs, in data.noun order."""
    from splice.data import wordnet_supersense as wn

    answers: dict[str, set[str]] = {}
    order: list[str] = []
    with open(wn.find_source(), encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip() or line.startswith(" "):
                continue
            label, words, _ = wn.parse_synset_line(line)
            word = words[0]
            if word not in answers:
                answers[word] = set()
                order.append(word)
            answers[word].add(wn.NOUN_LEXNAMES[label].removeprefix("noun."))
    return [
        LMExample(prompt_of(w), " " + next(iter(answers[w]))) for w in order if len(answers[w]) == 1
    ]


def prompt_of(word: str) -> str:
    return f"Word: {word}\nCategory:"


def load_examples(ref: str) -> tuple[TaskKind, list[LMExample]]:
    """(kind, examples) of a built-in name or a user file."""
    if ref in EXACT_MATCH:
        return "exact_match", category_pairs()
    if ref in DOMAINS:
        return "lm", [LMExample("", t) for t in _texts(ref) if t.strip()]
    path = Path(ref)
    if path.suffix in (".txt", ".jsonl", ".ndjson", ".csv", ".tsv"):
        from splice.train.lm_objective import lm_examples

        examples = lm_examples(path)
        prompted = {bool(e.prompt) for e in examples}
        if len(prompted) > 1:
            raise DataError(f"{ref}: mixes text rows and prompt/completion rows")
        return ("exact_match" if prompted == {True} else "lm"), examples
    from splice.config_errors import did_you_mean

    raise DataError(
        f"task {ref!r} is not an LM-pool task{did_you_mean(ref, list(BUILTIN))} "
        f"(built-in: {', '.join(BUILTIN)}; or a .txt / .jsonl / .csv / .tsv file)"
    )


def split_examples(examples: list[LMExample], sizes: DataSizes) -> dict[str, list[LMExample]]:
    """Seeded shuffle, 80/10/10, each part capped (see the module docstring)."""
    order = list(range(len(examples)))
    random.Random(sizes.split_seed).shuffle(order)
    n_eval = max(1, round(0.1 * len(order)))
    cuts = {
        "test": order[:n_eval][: sizes.test_max],
        "validation": order[n_eval : 2 * n_eval][: sizes.validation_max],
        "train": order[2 * n_eval :][: sizes.train_max],
    }
    return {n: [examples[i] for i in cuts[n]] for n in SPLIT_NAMES}


def prepare_lm_task(ref: str, sizes: DataSizes) -> LMTaskData:
    from splice.bench.tasks import display_name

    kind, examples = load_examples(ref)
    parts = split_examples(examples, sizes)
    for n in SPLIT_NAMES:
        if not parts[n]:
            raise DataError(f"task {ref}: no {n} examples (at least 3 are needed)")
    return LMTaskData(display_name(ref), ref, kind, parts)
