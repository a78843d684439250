"""The documentation's references resolve: every relative link of README.md and docs/*.md (and docker/README.md)
names a file that exists and, with ``#anchor``, a heading of that file; every repository path they cite in
backticks exists. No server, no model: a reader's broken link is found here, not by the reader.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "docker" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[(?:[^\]]|\][^(])*?\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
CODE_SPAN = re.compile(r"`([^`\n]+)`")
PATH_WORD = re.compile(r"[\w.\-/]+")
GENERATED = ("build/", ".venv/")  # made by setup and the scripts, not part of the repository
TOP_LEVEL = {p.name for p in ROOT.iterdir()} - {".git"}


def prose(text: str) -> str:
    """The text without its fenced code blocks (commands there may name files a run creates)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for line in prose(doc.read_text()).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def relative_links(doc: Path) -> list[str]:
    return [target for target in LINK.findall(prose(doc.read_text()))
            if not re.match(r"[a-z][a-z0-9+.-]*:", target)]  # http:, https:, mailto: are not ours to check


def cited_paths(doc: Path) -> set[str]:
    """Words in backticks that look like a path of this repository: under one of its top-level entries, with a
    "/" and a file extension or a trailing "/" (``scalellm/models/cpu.py``, ``deploy/kubernetes/``)."""
    cited = set()
    for span in CODE_SPAN.findall(prose(doc.read_text())):
        for word in PATH_WORD.findall(span.split("::")[0]):
            word = word.rstrip(".")
            if "/" not in word or word.startswith(("/", "./", "../")) or word.startswith(GENERATED):
                continue
            if word.split("/")[0] not in TOP_LEVEL:
                continue
            if word.endswith("/") or re.search(r"\.[A-Za-z0-9]+$", word.rsplit("/", 1)[-1]):
                cited.add(word)
    return cited


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: str(d.relative_to(ROOT)))
def test_every_relative_link_resolves(doc: Path) -> None:
    broken = []
    for target in relative_links(doc):
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            broken.append(f"{target}: no {file.relative_to(ROOT) if file.is_relative_to(ROOT) else file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.relative_to(ROOT)}")
    assert not broken, f"{doc.relative_to(ROOT)}: " + "; ".join(broken)


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: str(d.relative_to(ROOT)))
def test_every_cited_repository_path_exists(doc: Path) -> None:
    missing = sorted(path for path in cited_paths(doc) if not (ROOT / path).exists())
    assert not missing, f"{doc.relative_to(ROOT)} cites paths that do not exist: {missing}"


def test_every_image_in_docs_is_shown_somewhere() -> None:
    """An image no document shows is a leftover: delete it, or show it where it still says something true."""
    shown = {(doc.parent / target.partition("#")[0]).resolve() for doc in DOCS for target in relative_links(doc)}
    unshown = sorted(p.name for p in (ROOT / "docs").glob("*.png") if p.resolve() not in shown)
    assert not unshown, f"images in docs/ that no document shows: {unshown}"


def test_the_checks_see_what_they_check() -> None:
    """The parsers find links, anchors and paths (a check that finds nothing would pass on anything)."""
    readme = ROOT / "README.md"
    assert "docs/benchmarks.md" in relative_links(readme)
    assert "scalellm/triton/contract.py" in cited_paths(readme)
    assert "quick-start" in anchors(readme)
    assert slug("Several replicas behind the router, and the OpenAI API") == \
        "several-replicas-behind-the-router-and-the-openai-api"
