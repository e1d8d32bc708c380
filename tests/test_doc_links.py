"""Every relative link in README.md and the docs points at a file of the checkout: a newcomer who
follows one never lands on a dead link after a file is moved or renamed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("deploy/**/README.md")])
# [text](target) and <img src="target">; a target with a scheme (https:, mailto:) or only a
# fragment (#section) is not a file of the checkout.
LINK = re.compile(r"\]\(([^)\s]+)\)|<img\b[^>]*\bsrc=\"([^\"]+)\"")
NOT_A_FILE = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*:|#")


def relative_links(text: str) -> list[str]:
    targets = (match.group(1) or match.group(2) for match in LINK.finditer(text))
    return [target.split("#", 1)[0] for target in targets if not NOT_A_FILE.match(target)]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_points_at_a_file(page: Path) -> None:
    dead = [link for link in relative_links(page.read_text(encoding="utf-8")) if not (page.parent / link).exists()]
    assert dead == [], f"dead links in {page.relative_to(ROOT)}: {dead}"


def test_the_link_finder_sees_markdown_links_and_images_and_skips_urls() -> None:
    text = '[a](docs/A.md) [b](B.md#part) [c](https://x.org/y) [d](#top) <img src="p.png" width="2">'
    assert relative_links(text) == ["docs/A.md", "B.md", "p.png"]
