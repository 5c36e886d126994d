"""WordNet 3.0 verb supersense, 15 classes, from the Debian package ``wordnet-base``.

Source: ``/usr/share/wordnet/data.verb`` (13,767 synsets), same line format as
``data.noun`` plus verb frame fields before the ``|``; parsed by
`splice.data.wordnet_supersense` (one parser for both parts of speech). The label is the
lexicographer file 29 (verb.body) to 43 (verb.weather) of WordNet's ``lexnames`` list.
Class sizes are uneven: verb.change 2,383 ... verb.weather 81 synsets.

Labels: ``lex_filenum - 29``: verb.body = 0 ... verb.weather = 14. Text, ``with_lemmas`` and
``dedupe``: as for the noun task (the gloss: definition plus quoted example sentences).

License of the source: WordNet 3.0 license (Princeton University; BSD-like, free use,
copy and redistribution with the copyright notice).
"""

from __future__ import annotations

from pathlib import Path

from splice.data.dataset import TextClassificationDataset
from splice.data.wordnet_supersense import PartOfSpeech, find_data_file, load_supersenses

NAME = "wordnet_verb_supersense"
FIRST_VERB_FILE = 29
VERB_LEXNAMES = (
    "verb.body",  # 29
    "verb.change",  # 30
    "verb.cognition",  # 31
    "verb.communication",  # 32
    "verb.competition",  # 33
    "verb.consumption",  # 34
    "verb.contact",  # 35
    "verb.creation",  # 36
    "verb.emotion",  # 37
    "verb.motion",  # 38
    "verb.perception",  # 39
    "verb.possession",  # 40
    "verb.social",  # 41
    "verb.stative",  # 42
    "verb.weather",  # 43
)
VERB = PartOfSpeech(NAME, "data.verb", "v", FIRST_VERB_FILE, VERB_LEXNAMES)


def find_source(root: str | Path | None = None) -> Path:
    """``data.verb`` in ``root`` (default ``/usr/share/wordnet``)."""
    return find_data_file(VERB, root)


def load_wordnet_verb_supersense(
    root: str | Path | None = None,
    *,
    with_lemmas: bool = False,
    dedupe: bool = True,
) -> TextClassificationDataset:
    """Load the verb synsets; ``root`` is the folder holding ``data.verb``."""
    return load_supersenses(VERB, root, with_lemmas=with_lemmas, dedupe=dedupe)
