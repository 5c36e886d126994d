"""WordNet 3.0 noun supersense, 26 classes, from the Debian package ``wordnet-base``.

Source: ``/usr/share/wordnet/data.noun``. Every line not starting with a space is a synset:
``offset lex_filenum ss_type w_cnt word lex_id [word lex_id ...] p_cnt [pointers] | gloss``
(``w_cnt`` is two hex digits). The label is the lexicographer file, the noun "supersense"
(Ciaramita & Johnson 2003): file numbers 03 (noun.Tops) to 28 (noun.time) of WordNet's
``lexnames`` list, hard-coded below because ``wordnet-base`` does not ship that file.

Choices:
- Labels: ``lex_filenum - 3``, so noun.Tops = 0 ... noun.time = 25; the names are the
  lexicographer file names.
- Text: the gloss after ``'| '`` (definition plus any quoted examples), stripped. With
  ``with_lemmas=True`` it is prefixed by the synset's words, underscores as spaces:
  ``"dog, domestic dog, Canis familiaris: a member of the genus Canis ..."``. The default is
  the gloss alone (the lemmas make the task much easier: many carry the answer, e.g.
  "oak tree" in noun.plant).
- Synsets with identical text are deduplicated by default (``dedupe``).
"""

from __future__ import annotations

from pathlib import Path

from splice.data.dataset import SourceMissingError, TextClassificationDataset, from_pairs
from splice.errors import DataError

NAME = "wordnet_supersense"
DEFAULT_ROOT = Path("/usr/share/wordnet")
INSTALL = "apt-get install -y wordnet-base  (or: bash scripts/install_data.sh)"
FIRST_NOUN_FILE = 3
NOUN_LEXNAMES = (
    "noun.Tops",  # 03
    "noun.act",  # 04
    "noun.animal",  # 05
    "noun.artifact",  # 06
    "noun.attribute",  # 07
    "noun.body",  # 08
    "noun.cognition",  # 09
    "noun.communication",  # 10
    "noun.event",  # 11
    "noun.feeling",  # 12
    "noun.food",  # 13
    "noun.group",  # 14
    "noun.location",  # 15
    "noun.motive",  # 16
    "noun.object",  # 17
    "noun.person",  # 18
    "noun.phenomenon",  # 19
    "noun.plant",  # 20
    "noun.possession",  # 21
    "noun.process",  # 22
    "noun.quantity",  # 23
    "noun.relation",  # 24
    "noun.shape",  # 25
    "noun.state",  # 26
    "noun.substance",  # 27
    "noun.time",  # 28
)


def find_source(root: str | Path | None = None) -> Path:
    """``data.noun`` in ``root`` (default ``/usr/share/wordnet``)."""
    path = Path(root if root is not None else DEFAULT_ROOT) / "data.noun"
    if not path.is_file():
        raise SourceMissingError(
            f"{NAME}: Debian package 'wordnet-base' is not installed (no {path}); install it "
            f"with: {INSTALL}"
        )
    return path


def parse_synset_line(line: str) -> tuple[int, list[str], str]:
    """``(label, words, gloss)`` of one data.noun synset line; ValueError if malformed."""
    head, sep, gloss = line.partition(" | ")
    if not sep:
        head, sep, gloss = line.rstrip("\n").partition("| ")
    fields = head.split(" ")
    lexfile = int(fields[1])
    if not FIRST_NOUN_FILE <= lexfile < FIRST_NOUN_FILE + len(NOUN_LEXNAMES):
        raise ValueError(f"lexicographer file {lexfile:02d} is not a noun file (03..28)")
    if fields[2] != "n":
        raise ValueError(f"synset type {fields[2]!r} is not 'n'")
    w_cnt = int(fields[3], 16)
    words = [w.replace("_", " ") for w in fields[4 : 4 + 2 * w_cnt : 2]]
    if len(words) != w_cnt or not sep:
        raise ValueError("truncated synset line")
    return lexfile - FIRST_NOUN_FILE, words, gloss.strip()


def load_wordnet_supersense(
    root: str | Path | None = None,
    *,
    with_lemmas: bool = False,
    dedupe: bool = True,
) -> TextClassificationDataset:
    """Load the noun synsets; ``root`` is the folder holding ``data.noun``."""
    path = find_source(root)
    pairs: list[tuple[str, int]] = []
    empty = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip() or line.startswith(" "):
                continue  # the license header lines start with two spaces
            try:
                label, words, gloss = parse_synset_line(line)
            except (ValueError, IndexError) as e:
                raise DataError(f"{NAME}: {path} line {number}: {e}") from None
            text = f"{', '.join(words)}: {gloss}" if with_lemmas else gloss
            if not gloss:
                empty += 1
                continue
            pairs.append((text, label))
    info = {"path": str(path), "empty_dropped": empty, "with_lemmas": with_lemmas}
    return from_pairs(pairs, NOUN_LEXNAMES, NAME, dedupe=dedupe, info=info)
