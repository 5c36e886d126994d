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

The parser and loader take a `PartOfSpeech` (data file, synset type, lexicographer file
range, names), so the verb task (`splice.data.wordnet_verb_supersense`) reuses them.
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class PartOfSpeech:
    """One WordNet data file: its name, synset type, first lexicographer file, lexnames."""

    task: str
    data_file: str
    ss_type: str
    first_file: int
    lexnames: tuple[str, ...]

    def label(self, lexfile: int) -> int:
        """``lexfile - first_file``; ValueError if the file is not one of this part of speech."""
        last = self.first_file + len(self.lexnames) - 1
        if not self.first_file <= lexfile <= last:
            raise ValueError(
                f"lexicographer file {lexfile:02d} is not a {self.lexnames[0].split('.')[0]} "
                f"file ({self.first_file:02d}..{last:02d})"
            )
        return lexfile - self.first_file


NOUN = PartOfSpeech(NAME, "data.noun", "n", FIRST_NOUN_FILE, NOUN_LEXNAMES)


def find_data_file(pos: PartOfSpeech, root: str | Path | None = None) -> Path:
    """``pos.data_file`` in ``root`` (default ``/usr/share/wordnet``)."""
    path = Path(root if root is not None else DEFAULT_ROOT) / pos.data_file
    if not path.is_file():
        raise SourceMissingError(
            f"{pos.task}: Debian package 'wordnet-base' is not installed (no {path}); install "
            f"it with: {INSTALL}"
        )
    return path


def find_source(root: str | Path | None = None) -> Path:
    """``data.noun`` in ``root`` (default ``/usr/share/wordnet``)."""
    return find_data_file(NOUN, root)


def parse_synset_line(line: str, pos: PartOfSpeech = NOUN) -> tuple[int, list[str], str]:
    """``(label, words, gloss)`` of one synset line of ``pos``'s data file; ValueError if
    malformed. Verb lines carry frame fields before the ``|``; only the head is parsed."""
    head, sep, gloss = line.partition(" | ")
    if not sep:
        head, sep, gloss = line.rstrip("\n").partition("| ")
    fields = head.split(" ")
    label = pos.label(int(fields[1]))
    if fields[2] != pos.ss_type:
        raise ValueError(f"synset type {fields[2]!r} is not {pos.ss_type!r}")
    w_cnt = int(fields[3], 16)
    words = [w.replace("_", " ") for w in fields[4 : 4 + 2 * w_cnt : 2]]
    if len(words) != w_cnt or not sep:
        raise ValueError("truncated synset line")
    return label, words, gloss.strip()


def load_supersenses(
    pos: PartOfSpeech,
    root: str | Path | None = None,
    *,
    with_lemmas: bool = False,
    dedupe: bool = True,
) -> TextClassificationDataset:
    """The synsets of ``pos``'s data file as (gloss, supersense) pairs (see the module doc)."""
    path = find_data_file(pos, root)
    pairs: list[tuple[str, int]] = []
    empty = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip() or line.startswith(" "):
                continue  # the license header lines start with two spaces
            try:
                label, words, gloss = parse_synset_line(line, pos)
            except (ValueError, IndexError) as e:
                raise DataError(f"{pos.task}: {path} line {number}: {e}") from None
            text = f"{', '.join(words)}: {gloss}" if with_lemmas else gloss
            if not gloss:
                empty += 1
                continue
            pairs.append((text, label))
    info = {"path": str(path), "empty_dropped": empty, "with_lemmas": with_lemmas}
    return from_pairs(pairs, pos.lexnames, pos.task, dedupe=dedupe, info=info)


def load_wordnet_supersense(
    root: str | Path | None = None,
    *,
    with_lemmas: bool = False,
    dedupe: bool = True,
) -> TextClassificationDataset:
    """Load the noun synsets; ``root`` is the folder holding ``data.noun``."""
    return load_supersenses(NOUN, root, with_lemmas=with_lemmas, dedupe=dedupe)
