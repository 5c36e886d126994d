"""The fortune tasks (topic, language) on a tiny fixture in fortune(6)'s real file format.

tests/data/fixtures/fortunes/: the ten topic files (one or two entries each), a ``.dat``
index (binary, skipped), and one file per other language: ``brasil`` (pt), ``cs/citace``
(+ ``cs/klasik-sk``, Slovak, excluded), ``de/computer`` (latin-1 bytes), ``eo/proverbaro``,
``es/ciencia.fortunes`` (+ ``es/off/``, rot13, skipped), ``it/leggi``, ``pl/bajki``.
``art`` holds an ASCII-art entry (dropped) and uses a ``%`` line with trailing blanks;
"Absence makes the heart grow fonder." is in both ``love`` and ``politics``.
"""

import pytest
from data_test_util import FIXTURES

from splice.data import SourceMissingError
from splice.data.fortune_file import clean_entry, read_fortunes
from splice.data.fortune_language import load_fortune_language
from splice.data.fortune_topic import CATEGORIES, load_fortune_topic
from splice.errors import DataError

ROOT = FIXTURES / "fortunes"
ART = "Art is long, and Time is fleeting. -- Henry Wadsworth Longfellow"


def test_clean_entry_collapses_whitespace_and_drops_non_prose():
    assert clean_entry("Art is long,\n\tand Time\r\n  is fleeting.\n") == (
        "Art is long, and Time is fleeting."
    )
    assert clean_entry("  _____\n |__|__| <=== ::\n") is None  # no letters
    assert clean_entry("Go home") is None  # 6 letters < 10
    assert clean_entry("x = f(a[0], b[1]) + g(c[2]); // ok") is None  # 10 letters of 25
    assert clean_entry("Ein schönes Gedicht") == "Ein schönes Gedicht"  # non-ASCII letters count


def test_read_fortunes_splits_on_percent_lines():
    texts, dropped = read_fortunes(ROOT / "art")
    assert texts == [ART, "I don't know much about art, but I know what I like."]
    assert dropped == 1  # the ASCII-art entry
    texts, _ = read_fortunes(ROOT / "de" / "computer")  # latin-1 bytes
    assert texts == ["Für Rechner gilt: schöne Grüße vom Übersetzer."]


def test_topic_labels_in_category_order_and_cross_category_conflict_dropped():
    ds = load_fortune_topic(ROOT)
    assert ds.label_names == CATEGORIES and len(CATEGORIES) == 10
    assert CATEGORIES[0] == "art" and CATEGORIES[-1] == "sports"
    # art has 2 entries; love and politics keep one each (the shared quote is dropped)
    assert ds.labels == (0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9)
    assert ds.texts[0] == ART
    assert ds.texts[ds.labels.index(6)] == "Love is the triumph of imagination over intelligence."
    assert ds.info["conflicting_dropped"] == 2 and ds.info["not_prose_dropped"] == 1
    kept = load_fortune_topic(ROOT, dedupe=False)
    assert len(kept) == 13 and kept.class_counts()["politics"] == 2


def test_language_sources_labels_and_exclusions():
    ds = load_fortune_language(ROOT, max_words=0)
    assert ds.label_names == ("cs", "de", "en", "eo", "es", "it", "pl", "pt")
    counts = ds.class_counts()
    # en: the 12 prose entries of the ten topic files, the shared quote once (same label)
    assert counts == {"cs": 1, "de": 1, "en": 12, "eo": 1, "es": 1, "it": 1, "pl": 1, "pt": 1}
    assert ds.info["duplicates_dropped"] == 1
    texts = dict(zip(ds.labels, ds.texts))
    assert texts[0] == "Lépe je bydlet v zemi pusté, než s ženou svárlivou."  # not klasik-sk
    assert texts[4].startswith("La ciencia")  # es/off/ (rot13) is not read
    assert texts[7] == "Porque a galinha atravessa a rua? Porque o upstream mandou!"


def test_language_max_words_cuts_each_entry():
    ds = load_fortune_language(ROOT)  # default: the first 6 words
    assert ds.info["max_words"] == 6
    assert ds.texts[0] == "Lépe je bydlet v zemi pusté,"
    assert ds.texts[ds.labels.index(3)] == "Abelujon ne incitu, amason ne spitu"  # 6 words
    assert load_fortune_language(ROOT, max_words=2).texts[1] == "Für Rechner"
    with pytest.raises(DataError, match="max_words must be an integer >= 0"):
        load_fortune_language(ROOT, max_words=-1)


def test_missing_packages_name_the_package_and_install_command(tmp_path):
    with pytest.raises(SourceMissingError, match=r"'fortunes' is not installed .*apt-get install"):
        load_fortune_topic(tmp_path)
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in CATEGORIES:
        (partial / name).write_text("Some English fortune text here.\n")
    with pytest.raises(SourceMissingError, match=r"'fortunes-cs' is not installed") as e:
        load_fortune_language(partial)
    assert "\n" not in str(e.value)
    assert "apt-get install -y fortunes fortunes-br fortunes-cs" in str(e.value)
