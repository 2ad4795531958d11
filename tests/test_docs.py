"""The README stays short and every page it leads to exists: links between README.md and docs/*.md
point to files that are there (and, with #anchor, to a heading of that page), and every docs page
is linked from the README. Pure file reading: no package import, no run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 250

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")  # [text](target) and ![alt](target)
FENCE = re.compile(r"^\s*(```|~~~)")


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def prose_lines(path: Path) -> list[str]:
    """The page's lines outside fenced code blocks (a code sample may hold text that looks like a link)."""
    lines, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def links(path: Path) -> list[str]:
    """Every markdown link target of a page, inline code spans left out."""
    found = []
    for line in prose_lines(path):
        found += LINK.findall(re.sub(r"`[^`]*`", "", line))
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation other than '-' and '_' removed, spaces to '-'."""
    text = re.sub(r"`", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a page's headings, repeated headings numbered as GitHub numbers them."""
    seen: dict[str, int] = {}
    found = set()
    for line in prose_lines(path):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def broken_links(path: Path) -> list[str]:
    """The relative links of ``path`` whose file is missing or whose #anchor names no heading there."""
    broken = []
    for target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):
            continue  # http(s), mailto and the like; pure in-page anchors
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve()
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target} (no heading with anchor #{anchor} in {linked.name})")
    return broken


def test_readme_is_at_most_250_lines() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files_and_headings(page: Path) -> None:
    assert broken_links(page) == []


def test_every_docs_page_is_linked_from_the_readme() -> None:
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in links(README)}
    unlinked = [p.name for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert unlinked == [], f"docs pages that README.md does not link to: {unlinked}"


def test_the_link_check_catches_a_broken_link_and_a_wrong_anchor(tmp_path: Path) -> None:
    (tmp_path / "there.md").write_text("# A heading, with `code` and punctuation!\n\n## Second part\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](there.md) [ok](there.md#a-heading-with-code-and-punctuation) [ok](there.md#second-part)\n"
                    "[web](https://example.org/missing.md) [here](#anywhere)\n"
                    "[gone](missing.md) [bad](there.md#no-such-heading) ![img](missing.png)\n"
                    "```\n[in code](not-checked.md)\n```\n")
    assert broken_links(page) == ["missing.md (no such file)",
                                  "there.md#no-such-heading (no heading with anchor #no-such-heading in there.md)",
                                  "missing.png (no such file)"]
