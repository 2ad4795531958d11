"""File output and input: whole files (config, summary, checkpoints) are written atomically, so a
crash never leaves one truncated; metrics.jsonl grows a line at a time, so a run killed mid-write
can leave its last line torn, which readers leave out. JSON is strict (non-finite numbers become
null), and any other damage read back is an error that names the file."""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over the target."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give outputs the usual mode
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, to_json(obj, indent=2) + "\n")


def to_json(obj: Any, indent: int | None = None) -> str:
    """Standard JSON: nan and inf (e.g. the accuracy of an empty split) are written as null."""
    return json.dumps(_finite_or_none(obj), indent=indent, allow_nan=False)


def _finite_or_none(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: _finite_or_none(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(value) for value in obj]
    return obj


def read_json(path: str | os.PathLike) -> Any:
    """One JSON document; a damaged file is an error that names it."""
    return _parse(Path(path), Path(path).read_text(encoding="utf-8"), "")


@dataclass(frozen=True)
class JsonLines:
    """The records of a JSON-lines file, and whether its torn last line was left out."""

    records: list[Any]
    torn: bool


def read_jsonl(path: str | os.PathLike) -> JsonLines:
    """One JSON value per non-empty line. :class:`JsonlWriter` appends each line with one write, so
    a kill can tear only the last: one that lacks its newline or is not valid JSON is left out. A
    damaged line before it is an error that names the file and line."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").split("\n")
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    torn = bool(numbered) and (numbered[-1][0] == len(lines) or not _is_json(numbered[-1][1]))
    complete = numbered[:-1] if torn else numbered
    return JsonLines([_parse(path, line, f" line {n}") for n, line in complete], torn)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def _parse(path: Path, text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}{where} is not valid JSON ({exc}); the file is damaged: rewrite it or "
                          "run again") from None


def atomic_write_png(figure: Any, path: str | os.PathLike) -> None:
    """Render a matplotlib Figure to PNG in memory, then write it atomically."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())


class JsonlWriter:
    """Appends one JSON object per line and flushes it, so a killed run keeps every finished round."""

    def __init__(self, path: str | os.PathLike, append: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "a" if append else "w", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._handle.write(to_json(record) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()
