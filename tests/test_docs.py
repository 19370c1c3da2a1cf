"""The docs hold together: every relative link in README.md and docs/*.md reaches an existing file,
and a heading of it when the link names one (``#anchor``, by GitHub's anchor rules); the README
stays short; the docs index lists every page."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(`+).+?\1")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def doc_files(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def prose_lines(path: Path, inline_code: bool = False) -> list[tuple[int, str]]:
    """``(line number, text)`` of the lines outside fenced code blocks; inline code spans removed
    (a link inside one is not a link) unless ``inline_code`` (a heading's anchor includes its code)."""
    lines, fence = [], None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        marker = re.match(r"^ {0,3}(`{3,}|~{3,})", line)
        if marker:
            if fence is None:
                fence = marker.group(1)
            elif marker.group(1)[0] == fence[0] and len(marker.group(1)) >= len(fence):
                fence = None
            continue
        if fence is None:
            lines.append((number, line if inline_code else INLINE_CODE.sub("", line)))
    return lines


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text (links and code as their text), lower case,
    punctuation other than ``-`` and ``_`` dropped, each space a ``-``."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file; a repeated slug gets ``-1``, ``-2``, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(path, inline_code=True):
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def broken_links(paths: list[Path], root: Path = ROOT) -> list[str]:
    """``FILE:LINE: TARGET (why)`` for each relative link that does not resolve (FILE relative to root)."""
    broken = []
    for path in paths:
        for number, line in prose_lines(path):
            for target in LINK.findall(line):
                if not target or SCHEME.match(target):
                    continue
                file_part, _, anchor = unquote(target).partition("#")
                dest = (path.parent / file_part).resolve() if file_part else path
                where = f"{path.relative_to(root)}:{number}: {target}"
                if not dest.exists():
                    broken.append(f"{where} (no file {file_part})")
                elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                    broken.append(f"{where} (no heading #{anchor} in {dest.name})")
    return broken


def test_every_relative_link_resolves():
    broken = broken_links(doc_files())
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_checker_finds_bad_links(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text(
        "# Page\n\n## Teachers (`--teacher`)\n\n## Same\n\n## Same\n\n```\n# not a heading\n```\n",
        encoding="utf-8",
    )
    (tmp_path / "README.md").write_text(
        "# Top\n\n"
        "[ok](docs/page.md) [ok](docs/page.md#teachers---teacher) [ok](docs/page.md#same-1) [ok](#top)\n"
        "[web](https://example.com/x.md) [mail](mailto:a@b.c) `[code](missing.md)`\n"
        "[gone](docs/missing.md)\n"
        "[bad anchor](docs/page.md#teachers)\n"
        "[third same](docs/page.md#same-2) [fenced heading](docs/page.md#not-a-heading) [here](#nowhere)\n"
        "```\n[in a code block](missing.md)\n```\n",
        encoding="utf-8",
    )
    found = broken_links(doc_files(tmp_path), tmp_path)
    assert [f.split(" (")[0] for f in found] == [
        "README.md:5: docs/missing.md",
        "README.md:6: docs/page.md#teachers",
        "README.md:7: docs/page.md#same-2",
        "README.md:7: docs/page.md#not-a-heading",
        "README.md:7: #nowhere",
    ], found


def test_github_slugs():
    assert github_slug("Teachers (`--teacher`)") == "teachers---teacher"
    assert github_slug("Stage timings of a run (what `report.json` records)") == "stage-timings-of-a-run-what-reportjson-records"
    assert github_slug("Exact soft DarkRank: probability DP vs log-space DP vs enumeration") == (
        "exact-soft-darkrank-probability-dp-vs-log-space-dp-vs-enumeration"
    )
    assert github_slug("Mining helpers (`distill.losses.mining`)") == "mining-helpers-distilllossesmining"
    assert github_slug("See [the data](data.md) **now**") == "see-the-data-now"


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_the_docs_index_lists_every_page():
    index = ROOT / "docs" / "README.md"
    linked = {target.partition("#")[0] for _, line in prose_lines(index) for target in LINK.findall(line)}
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} - {"README.md"}
    assert pages <= linked, f"docs/README.md does not link {sorted(pages - linked)}"
