"""Reading metrics.jsonl back: a torn last line is a write a kill cut short; other damage is an error."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from p2p_fedrot.errors import ConfigError
from p2p_fedrot.io import read_jsonl

COMPLETE = '{"round": 0}\n{"round": 1}\n'


@pytest.mark.parametrize("text,torn", [
    (COMPLETE, False),
    (COMPLETE + "\n\n", False),  # blank lines are no records
    (COMPLETE + '{"round": 2, "accur', True),  # cut short before its newline
    (COMPLETE + '{"round": 2}', True),  # the JSON was written, its newline was not
    (COMPLETE + '{"round": 2, "accur\n', True),  # not valid JSON at the end
    (COMPLETE + '{"round": 2, "accur\n\n', True),
])
def test_a_torn_last_line_is_left_out(tmp_path: Path, text: str, torn: bool) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(text)
    lines = read_jsonl(path)
    assert lines.records == [{"round": 0}, {"round": 1}] and lines.torn == torn


def test_a_damaged_line_before_the_last_is_named(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 0}\n{"round": 1, "accur\n{"round": 2}\n')
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))} line 2 is not valid JSON .*damaged"):
        read_jsonl(path)
