"""Language of a fortune cookie, 8 classes, from Debian's ``fortunes*`` packages.

Sources (``/usr/share/games/fortunes/``, `splice.data.fortune_file` format and cleaning),
one Debian package per language, entries before cleaning in Debian 12 (bookworm):

    cs  fortunes-cs  cs/*  (minus klasik-sk, Slovak)   7,383   GPL
    de  fortunes-de  de/*                             18,761   GPL-2+
    en  fortunes     the ten fortune_topic files       4,010   BSD
    eo  fortunes-eo  eo/proverbaro                     2,626   GPL (translation)
    es  fortunes-es  es/*  (not es/off/, rot13)       10,786   GPL-2+; quotes public domain
    it  fortunes-it  it/*                              8,505   public domain ("freeware")
    pl  fortunes-pl  pl/*                              7,927   GPL-2+
    pt  fortunes-br  brasil (Brazilian Portuguese)     2,506   GPL

Labels: the ISO 639-1 codes, sorted (cs = 0 ... pt = 7). Text: one entry, whitespace
collapsed; ASCII art and code listings dropped by the prose filter. English is the ten
topical files of `splice.data.fortune_topic` (a fixed list, so the data does not change
with whatever other English fortune packages are installed). The task is not just
script or alphabet: all eight languages use Latin script, and the Romance trio
es / it / pt and the quotes of English authors in every language make it non-trivial
on short entries. Entries whose exact text occurs in two languages (untranslated English
quotes) are dropped by ``dedupe`` (default).
"""

from __future__ import annotations

from pathlib import Path

from splice.data.dataset import SourceMissingError, TextClassificationDataset, from_pairs
from splice.data.fortune_file import fortune_files, read_fortunes
from splice.data.fortune_topic import CATEGORIES as ENGLISH_FILES
from splice.errors import DataError

NAME = "fortune_language"
DEFAULT_ROOT = Path("/usr/share/games/fortunes")
PACKAGES = (
    "fortunes",
    "fortunes-br",
    "fortunes-cs",
    "fortunes-de",
    "fortunes-eo",
    "fortunes-es",
    "fortunes-it",
    "fortunes-pl",
)
INSTALL = f"apt-get install -y {' '.join(PACKAGES)}  (or: bash scripts/install_data.sh)"
# language -> (Debian package, sub-folder or None for files in the top folder, files there)
LANGUAGES: dict[str, tuple[str, str | None, tuple[str, ...]]] = {
    "cs": ("fortunes-cs", "cs", ()),
    "de": ("fortunes-de", "de", ()),
    "en": ("fortunes", None, ENGLISH_FILES),
    "eo": ("fortunes-eo", "eo", ()),
    "es": ("fortunes-es", "es", ()),
    "it": ("fortunes-it", "it", ()),
    "pl": ("fortunes-pl", "pl", ()),
    "pt": ("fortunes-br", None, ("brasil",)),
}
EXCLUDE = ("klasik-sk",)
DEFAULT_MAX_WORDS = 6  # the one Slovak file in fortunes-cs's cs/ folder


def language_files(root: Path) -> dict[str, list[Path]]:
    """Each language's files under ``root``; `SourceMissingError` naming the first package
    whose files are absent."""
    out: dict[str, list[Path]] = {}
    for lang, (package, sub, names) in LANGUAGES.items():
        if sub is None:
            files = [root / n for n in names]
            ok = all(f.is_file() for f in files)
        else:
            folder = root / sub
            files = fortune_files(folder, EXCLUDE) if folder.is_dir() else []
            ok = bool(files)
        if not ok:
            where = root / sub if sub is not None else root / names[0]
            raise SourceMissingError(
                f"{NAME}: Debian package '{package}' is not installed (no {where}); "
                f"install it with: {INSTALL}"
            )
        out[lang] = files
    return out


def find_source(root: str | Path | None = None) -> Path:
    """The fortunes folder (default ``/usr/share/games/fortunes``), checked for all eight."""
    folder = Path(root if root is not None else DEFAULT_ROOT)
    language_files(folder)
    return folder


def load_fortune_language(
    root: str | Path | None = None, *, max_words: int = DEFAULT_MAX_WORDS, dedupe: bool = True
) -> TextClassificationDataset:
    """Load every language's entries, each cut to its first ``max_words`` words (0: whole);
    ``root`` is the fortunes folder."""
    if isinstance(max_words, bool) or not isinstance(max_words, int) or max_words < 0:
        raise DataError(f"{NAME}: max_words must be an integer >= 0, got {max_words!r}")
    folder = Path(root if root is not None else DEFAULT_ROOT)
    files = language_files(folder)
    pairs: list[tuple[str, int]] = []
    dropped = 0
    for label, lang in enumerate(LANGUAGES):
        for f in files[lang]:
            texts, n_dropped = read_fortunes(f)
            dropped += n_dropped
            if max_words:
                texts = [" ".join(t.split(" ")[:max_words]) for t in texts]
            pairs.extend((text, label) for text in texts)
    info = {"path": str(folder), "not_prose_dropped": dropped, "max_words": max_words}
    return from_pairs(pairs, tuple(LANGUAGES), NAME, dedupe=dedupe, info=info)
