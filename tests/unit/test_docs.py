"""The docs against the code: the exit-code page is the code's own table, the loader's refusals are
the loader's, the README is a front door (at most 150 lines), and every link between the pages
leads to a file that exists."""

import re
from pathlib import Path

from cudabuild.errors import LOADER_EXIT_CODES, exit_codes_page

REPO = Path(__file__).resolve().parents[2]


def test_the_exit_code_page_is_made_from_the_code():
    page = (REPO / "docs" / "exit-codes.md").read_text()
    assert page == exit_codes_page(), "docs/exit-codes.md differs from cudabuild/errors.py: run scripts/exit-codes-page"


def test_the_loaders_refusals_are_the_loaders_own():
    said = {int(code) for code in re.findall(r"\bfail (1[0-9]) ", (REPO / "images" / "loader.sh").read_text())}
    assert said == {code for code, _ in LOADER_EXIT_CODES}


def test_the_readme_is_a_front_door_that_opens_with_the_two_commands():
    readme = (REPO / "README.md").read_text().splitlines()
    assert len(readme) <= 150, f"README.md has {len(readme)} lines; a capability's details belong in docs/"
    assert readme[2:6] == ["```", readme[3], readme[4], "```"]
    assert readme[3].startswith("bash scripts/setup && ") and readme[4] == "bash scripts/setup && .venv/bin/python -m pytest"


def test_every_link_between_the_pages_leads_somewhere():
    pages = [REPO / "README.md", REPO / "BENCHMARKS.md", *(REPO / "docs").glob("*.md")]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert not broken, broken
