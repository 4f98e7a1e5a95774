"""Every code block of README.md and docs/ that a user would paste runs (see ``docs_snippets``).

The pages run under the ``docs`` marker (minutes: they register with the shipped model);
the checks of the harness itself are fast and run by default.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from diffusereg.phantom import write_phantom
from docs_snippets import PAGES, REPOSITORY, RUN_LANGUAGES, Snippet, make_sandbox, run_snippet, snippets

SHARED = REPOSITORY.parent / "shared"
SHELL_LANGUAGES = ("sh", "shell", "console", "zsh")


def run_page(blocks: list[Snippet], root: Path) -> list[str]:
    """Run a page's blocks in one sandbox under ``root`` (with the phantom case as ``fixed.nii.gz``,
    ``moving.nii.gz``, ``fixed_labels.nii.gz``, ``moving_labels.nii.gz``); return the reasons of
    the blocks not run. Raises AssertionError naming the first block that fails, with its output."""
    work = make_sandbox(root, SHARED if SHARED.is_dir() else None)
    write_phantom(work)
    for block in blocks:
        if not block.runs and block.file_name is None:
            continue
        result = run_snippet(block, work)
        if result.returncode != 0:
            raise AssertionError(f"{block.where}: the {block.language} block failed (exit {result.returncode})\n"
                                 f"--- block\n{block.body}--- stdout (end)\n{result.stdout[-3000:]}\n"
                                 f"--- stderr (end)\n{result.stderr[-3000:]}")
    return [f"{block.where}: {block.not_run}" for block in blocks if block.not_run is not None]


def test_every_pasteable_block_runs_or_says_why_not() -> None:
    """A python/bash block is run unless a ``not-run`` comment gives a reason; shell blocks are
    written as bash (so they run); ``file:`` blocks name a file."""
    problems = []
    for page in PAGES:
        for block in snippets(page):
            if block.language in SHELL_LANGUAGES and block.not_run is None:
                problems.append(f"{block.where}: a {block.language} block: write it as bash (it is then run)")
            if block.not_run is not None and not block.not_run.strip():
                problems.append(f"{block.where}: not-run needs a reason")
            if block.not_run is not None and block.language not in (*RUN_LANGUAGES, *SHELL_LANGUAGES):
                problems.append(f"{block.where}: not-run on a {block.language or 'plain'} block, which never runs")
    assert not problems, "\n".join(problems)
    assert sum(block.runs for page in PAGES for block in snippets(page)) >= 20


@pytest.mark.slow
def test_a_broken_block_fails_naming_its_page_and_line(tmp_path: Path) -> None:
    page = REPOSITORY / "docs" / "broken.md"
    text = "# A page\n\n```python\nfrom diffusereg import DiffuseRegPipeline\nDiffuseRegPipeline.no_such_method()\n```\n"
    with pytest.raises(AssertionError, match=r"docs/broken.md:3: the python block failed") as caught:
        run_page(snippets(page, text), tmp_path)
    assert "AttributeError" in str(caught.value)


def test_file_blocks_are_written_and_not_run_blocks_skipped(tmp_path: Path) -> None:
    text = ("<!-- file: pairs.csv -->\n```csv\nfixed,moving\nfixed.nii.gz,moving.nii.gz\n```\n"
            "<!-- not-run: the install command -->\n```bash\nexit 1\n```\n"
            "```bash\ntest \"$(head -1 pairs.csv)\" = fixed,moving\n```\n")
    assert run_page(snippets(REPOSITORY / "docs" / "files.md", text), tmp_path) == ["docs/files.md:7: the install command"]


def _pages_that_run() -> list[Path]:
    return [page for page in PAGES if any(block.runs for block in snippets(page))]


@pytest.mark.docs
@pytest.mark.parametrize("page", _pages_that_run(), ids=lambda page: str(page.relative_to(REPOSITORY)))
def test_page_blocks_run(page: Path, tmp_path: Path) -> None:
    blocks = snippets(page)
    if not SHARED.is_dir() and any("../shared" in block.body for block in blocks if block.runs):
        pytest.skip(f"{page.name} uses ACDC from ../shared, which is not beside the checkout ({SHARED})")
    for reason in run_page(blocks, tmp_path):
        print(f"not run: {reason}")
