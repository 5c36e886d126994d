"""`splice data list/show/split` through the real CLI entry point."""

import re

import pytest
from data_test_util import use_fixture_sources

from splice.cli import main
from splice.data import load_splits, load_task


def test_list_shows_installed_and_missing(monkeypatch, tmp_path, capsys):
    cache = use_fixture_sources(monkeypatch, tmp_path)
    assert main(["data", "list", "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\nbbc_news +yes +6  3: business, sports, tech\n", out)
    assert re.search(r"\nwordnet_supersense +yes +3  26: noun\.Tops, noun\.act", out)
    assert re.search(r"\nwordnet_verb_supersense +yes +2  15: verb\.body, verb\.change", out)
    assert re.search(r"\nfortune_topic +yes +11  10: art, computers, education,", out)
    assert re.search(r"\nfortune_language +yes +19  8: cs, de, en, eo, es, it, pl, pt\n", out)
    assert re.search(r"\nsotu_era +yes +0  6: 1790-1829, 1830-1869, ", out)
    assert main(["data", "list", "--cache-dir", str(tmp_path / "empty")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\nspam +no +- +-\n", out)
    assert re.search(
        r"\nsotu_era +no +- +-\n +install: bash scripts/install_data\.sh sotu_era", out
    )
    assert "install: bash scripts/install_data.sh" in out


def test_show_counts_and_examples(monkeypatch, tmp_path, capsys):
    use_fixture_sources(monkeypatch, tmp_path)
    assert main(["data", "show", "tweet_sentiment", "-o", "min_confidence=0.5"]) == 0
    out = capsys.readouterr().out
    assert "tweet_sentiment: 3 examples, 3 classes" in out
    assert re.search(r"\n +negative +1 +33\.3%\n +neutral +0 +0\.0%\n +positive +2 +66\.7%", out)
    assert len(re.findall(r"^\[\d+\] (negative|positive): ", out, flags=re.M)) == 3


def test_show_user_file_and_errors(tmp_path, capsys):
    f = tmp_path / "d.csv"
    f.write_text("text,label\nline one\nx,\n", encoding="utf-8")
    assert main(["data", "show", str(f)]) == 1
    assert "splice: error:" in capsys.readouterr().err
    assert main(["data", "show", "bbc_news", "-o", "bogus"]) == 1
    assert "--option expects KEY=VALUE" in capsys.readouterr().err


def test_split_writes_a_loadable_split(monkeypatch, tmp_path, capsys):
    use_fixture_sources(monkeypatch, tmp_path)
    out = tmp_path / "s.json"
    args = ["data", "split", "bbc_news", "--out", str(out), "--seed", "3"]
    assert main([*args, "--sizes", "0.5,0.5,0", "--max-train-per-class", "1"]) == 0
    assert "train 3, validation 3, test 0" in capsys.readouterr().out
    ds = load_task("bbc_news")
    s = load_splits(out, ds)
    assert s.seed == 3 and s.max_per_class == {"train": 1}
    assert main([*args, "--sizes", "0.5,x"]) == 1
    assert "--sizes expects" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["data"], ["data", "show"]])
def test_usage_errors(argv):
    with pytest.raises(SystemExit):
        main(argv)


def test_split_out_must_be_a_new_or_split_file(tmp_path, capsys):
    data = tmp_path / "d.csv"
    rows = [f"w{i} x{i},{'ab'[i % 2]}" for i in range(10)]
    data.write_text("text,label\n" + "\n".join(rows) + "\n")
    before = data.read_text()
    cases = {
        str(data): "is the data file itself",
        str(tmp_path): "is a folder",
        "": "is a folder",
        str(data / "split.json"): "is a file, not a folder",
        str(data / "a" / "split.json"): "is a file, not a folder",
    }
    for out, fragment in cases.items():
        assert main(["data", "split", str(data), "--out", out]) == 1
        err = capsys.readouterr().err
        assert err.startswith("splice: error: ") and fragment in err and "Traceback" not in err
    assert data.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.csv"]
    assert main(["data", "split", str(data), "--out", str(tmp_path / "s" / "split.json")]) == 0
