"""Text sources: packaged corpora, local files and HF names all load offline into the same shape."""

import json
import os
import time

import pytest

# Set before `datasets` is imported: it reads these once, and nothing here may touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import datasets  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from p2p_fedrot.data import sources  # noqa: E402
from p2p_fedrot.errors import ConfigError  # noqa: E402
from p2p_fedrot.data.sources import PACKAGED, TextCorpus, load_text_corpus  # noqa: E402


def _check_shape(corpus: TextCorpus, classes: int) -> None:
    assert len(corpus.class_names) == classes
    assert corpus.class_names == sorted(corpus.class_names)
    assert len(corpus.texts) == len(corpus.labels)
    assert all(corpus.texts)
    assert set(corpus.labels) == set(range(classes))


@pytest.mark.parametrize(
    ("short_name", "classes", "low", "high"),
    [("bbc_news", 5, 2225, 2225), ("health_tweets", 16, 63000, 63326), ("sentiment", 3, 37000, 39000)],
)
def test_packaged_corpora_load_offline(short_name: str, classes: int, low: int, high: int) -> None:
    corpus = load_text_corpus(f"packaged:{short_name}")
    _check_shape(corpus, classes)
    assert low <= len(corpus.texts) <= high
    assert corpus.name == f"packaged:{short_name}"


def test_bbc_news_classes_and_article_text() -> None:
    corpus = load_text_corpus("packaged:bbc_news")
    assert corpus.class_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert corpus.texts[0].startswith("Ad sales boost Time Warner profit Quarterly profits")
    assert "\n" not in corpus.texts[0]


def test_health_tweets_have_no_links() -> None:
    corpus = load_text_corpus("packaged:health_tweets")
    assert not [t for t in corpus.texts if "http" in t.lower() or "://" in t]


def test_loading_is_deterministic_and_callers_cannot_corrupt_cache() -> None:
    first = load_text_corpus("packaged:sentiment")
    first.texts.clear()
    first.labels.append(99)
    assert load_text_corpus("packaged:sentiment") == load_text_corpus("packaged:sentiment")
    assert len(load_text_corpus("packaged:sentiment").texts) > 0


ROWS = [("good film", "pos"), ("bad film", "neg"), ("so so", "mid"), ("great", "pos")]


def _write(path, fmt: str) -> str:
    if fmt == "csv":
        path.write_text("review,sentiment\n" + "".join(f"{text},{label}\n" for text, label in ROWS))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"review": text, "sentiment": label}) + "\n" for text, label in ROWS))
    else:
        table = pa.table({"review": [t for t, _ in ROWS], "sentiment": [label for _, label in ROWS]})
        pq.write_table(table, path)
    return str(path)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_local_file_maps_string_labels_sorted(tmp_path, fmt: str) -> None:
    path = _write(tmp_path / f"data.{fmt}", fmt)
    corpus = load_text_corpus(path, text_column="review", label_column="sentiment")
    assert corpus.class_names == ["mid", "neg", "pos"]
    assert corpus.texts == [t for t, _ in ROWS]
    assert corpus.labels == [2, 1, 0, 2]
    assert corpus == load_text_corpus(path, text_column="review", label_column="sentiment")


def test_local_file_integer_labels_and_default_columns(tmp_path) -> None:
    path = tmp_path / "ints.csv"
    path.write_text("text,label\na,7\nb,3\nc,7\n")
    corpus = load_text_corpus(str(path))
    assert corpus.class_names == ["3", "7"]
    assert corpus.labels == [1, 0, 1]


def test_missing_column_names_columns_and_option(tmp_path) -> None:
    path = _write(tmp_path / "data.csv", "csv")
    with pytest.raises(ConfigError, match=r"'text'.*\['review', 'sentiment'\].*data\.text_column"):
        load_text_corpus(path)
    with pytest.raises(ConfigError, match=r"'label'.*data\.label_column"):
        load_text_corpus(path, text_column="review")


def test_missing_file_is_config_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_text_corpus(str(tmp_path / "absent.jsonl"))


@pytest.mark.parametrize(
    ("suffix", "content", "reason"),
    [
        ("csv", "text,label\na,1\nb,2,3,4\n", "Expected 2 fields in line 3"),
        ("jsonl", '{"text": "a", "label": 1}\n{not json\n', "JSON parse error"),
        ("parquet", "not parquet", "Parquet magic bytes not found"),
    ],
)
def test_malformed_file_names_the_key_the_file_and_the_reason(tmp_path, suffix: str, content: str, reason: str) -> None:
    path = tmp_path / f"broken.{suffix}"
    path.write_text(content)
    with pytest.raises(ConfigError) as info:
        load_text_corpus(str(path))
    message = str(info.value)
    assert f"data.name={str(path)!r}" in message and reason in message, message
    assert "\n" not in message


def test_unknown_packaged_name_lists_choices() -> None:
    with pytest.raises(ConfigError, match="packaged:nope") as info:
        load_text_corpus("packaged:nope")
    assert all(f"packaged:{name}" in str(info.value) for name in PACKAGED)


def test_hf_class_label_names_are_kept(monkeypatch) -> None:
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["b", "a"])})
    cached = datasets.Dataset.from_dict({"text": ["x", "y"], "label": [1, 0]}, features=features)
    monkeypatch.setattr(sources, "_hf_load", lambda name, split: cached)
    corpus = load_text_corpus("some/cached-dataset")
    assert (corpus.class_names, corpus.labels) == (["b", "a"], [1, 0])


def test_uncached_hf_dataset_fails_fast_offline(monkeypatch) -> None:
    # Another test module may have imported `datasets` before the variables above were set.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="could not be loaded offline") as info:
        load_text_corpus("no-such-org/no-such-dataset-p2p")
    assert time.perf_counter() - start < 20
    message = str(info.value)
    assert "no-such-org/no-such-dataset-p2p" in message and "packaged:bbc_news" in message
    assert "Couldn't reach" in message  # the original error's first line
