"""The docs' code runs as written: every ```python block of docs/library.md, in order, in one namespace."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[3] / "docs"


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.S | re.M)


@pytest.mark.parametrize("page", ["library.md"])
def test_every_python_block_runs_as_written(page, one_torch_thread):
    blocks = python_blocks(DOCS / page)
    assert len(blocks) >= 4, f"{page}: expected its examples, found {len(blocks)} python blocks"
    namespace: dict = {}
    for number, block in enumerate(blocks, 1):
        try:
            exec(compile(block, f"{page} python block {number}", "exec"), namespace)
        except Exception as error:
            pytest.fail(f"{page}, python block {number} fails: {type(error).__name__}: {error}\n{block}")


REFERENCE_PAGES = ("library.md", "numerics.md", "guarantees.md")


@pytest.mark.parametrize("page", REFERENCE_PAGES)
def test_every_test_and_file_a_page_cites_exists(page):
    """A guarantee is only as good as the test it names: every `test_...` name a page cites is defined in
    tests/, and every repository path it cites (`knn_cm/...py`, `tests/...py`, `scripts/...`) exists."""
    root = DOCS.parent
    text = (DOCS / page).read_text()
    defined = {name for file in (root / "tests").rglob("*.py")
               for name in re.findall(r"^\s*def (test_\w+)", file.read_text(), flags=re.M)}
    cited = set(re.findall(r"(?<![/\w])(test_\w+)\b(?!\.py)", text))  # test names, not test files
    assert not cited - defined, f"{page} cites tests that do not exist: {sorted(cited - defined)}"
    paths = {path for path in re.findall(r"`([\w./-]+\.(?:py|md|yaml|sh))(?:::\w+)?`", text) if "/" in path}
    missing = sorted(path for path in paths if not (root / path).exists() and not (DOCS / path).exists())
    assert not missing, f"{page} cites files that do not exist: {missing}"
