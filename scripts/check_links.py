"""Check the links that `mkdocs build --strict` does not see.

- README.md: every relative link and picture must name a file of the repository, and an anchor
  (`page.md#heading`) a heading of that page.
- docs/: every file (page, table, picture) must be listed in mkdocs.yml's nav or linked from a page
  or from README.md, so nothing there is unreachable from the site or the repository's front page.

Usage: python scripts/check_links.py   (exit status 1 and one line per problem when something fails)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^\s*```")


def text_outside_code(path: Path) -> str:
    """The file's text without its fenced code blocks (a link shown as code is not a link)."""
    kept, in_fence = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            kept.append(line)
    return "\n".join(kept)


def relative_links(path: Path) -> list[str]:
    """Targets of the Markdown links and pictures in a file that point inside the repository."""
    targets = LINK.findall(re.sub(r"`[^`\n]*`", "", text_outside_code(path)))
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


def slugs(heading: str) -> set[str]:
    """The anchors GitHub and MkDocs give a heading (they differ only in how runs of '-' collapse)."""
    plain = re.sub(r"[`*_]", "", heading).strip().lower()
    github = re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", plain))
    return {github, re.sub(r"-{2,}", "-", github).strip("-")}


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    for line in text_outside_code(page).splitlines():
        match = HEADING.match(line)
        if match:
            found |= slugs(match.group(1))
    return found


def readme_problems() -> list[str]:
    problems = []
    readme = ROOT / "README.md"
    for target in dict.fromkeys(relative_links(readme)):  # each link once
        file_part, _, anchor = target.partition("#")
        path = (readme.parent / file_part).resolve()
        if not path.exists():
            problems.append(f"README.md: link to a missing file: {target}")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            problems.append(f"README.md: link to a missing heading: {target}")
    return problems


def nav_pages() -> set[Path]:
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    nav = config[config.index("\nnav:") :]
    return {(DOCS / page).resolve() for page in re.findall(r":\s*(\S+\.md)\s*$", nav, re.MULTILINE)}


def unreachable_docs() -> list[str]:
    reached = nav_pages()
    for page in [ROOT / "README.md", *DOCS.rglob("*.md")]:
        for target in relative_links(page):
            reached.add((page.parent / target.partition("#")[0]).resolve())
    return [
        f"docs/{path.relative_to(DOCS)}: no page links to it and the nav does not list it"
        for path in sorted(DOCS.rglob("*"))
        if path.is_file() and path.resolve() not in reached
    ]


def main() -> int:
    problems = readme_problems() + unreachable_docs()
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
