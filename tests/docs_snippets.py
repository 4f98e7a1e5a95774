"""The code blocks of README.md and docs/*.md, and how the test suite runs them.

A fenced block whose language is ``python`` or ``bash`` is run, in page order, in a sandbox folder
laid out like a checkout with ``../shared`` beside it; blocks of one page share the sandbox (a
block may use the files an earlier one wrote). Two HTML comments, on the line right before a
block, change that:

- ``<!-- not-run: REASON -->``: the block is not run (an install command, a signature summary,
  an hour-long training run); the reason is required and is reported.
- ``<!-- file: NAME -->``: the block is the content of the file ``NAME`` (e.g. a pair list),
  written into the sandbox before the blocks after it run.

Every other block (output samples, ``text``, layouts) is shown, not run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
PAGES = [REPOSITORY / "README.md", *sorted((REPOSITORY / "docs").glob("*.md"))]
RUN_LANGUAGES = ("python", "bash")
_BLOCK = re.compile(
    r"(?:^<!--\s*(?P<directive>not-run|file):\s*(?P<argument>.*?)\s*-->\n)?^```(?P<language>[\w-]*)\n(?P<body>.*?)^```",
    re.S | re.M)


@dataclass(frozen=True)
class Snippet:
    """One fenced code block: where it is, its language and text, and its directive."""

    page: Path
    line: int
    language: str
    body: str
    not_run: str | None = None
    file_name: str | None = None

    @property
    def runs(self) -> bool:
        return self.language in RUN_LANGUAGES and self.not_run is None and self.file_name is None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPOSITORY)}:{self.line}"


def snippets(page: Path, text: str | None = None) -> list[Snippet]:
    """Every fenced block of ``page`` (or of ``text``, read as that page)."""
    text = page.read_text(encoding="utf-8") if text is None else text
    found = []
    for match in _BLOCK.finditer(text):
        directive, argument = match.group("directive"), match.group("argument")
        line = text.count("\n", 0, match.start("language")) + 1
        found.append(Snippet(page, line, match.group("language"), match.group("body"),
                             not_run=argument if directive == "not-run" else None,
                             file_name=argument if directive == "file" else None))
    return found


def make_sandbox(root: Path, shared: Path | None) -> Path:
    """A working folder ``root/work`` that looks like the checkout's root to a snippet: the
    project's ``configs``, ``examples``, ``benchmarks`` and ``docs`` linked in, and
    ``root/shared`` linked to ``shared`` (so ``../shared/...`` paths work)."""
    work = root / "work"
    work.mkdir(parents=True)
    for name in ("configs", "examples", "benchmarks", "docs"):
        (work / name).symlink_to(REPOSITORY / name, target_is_directory=True)
    if shared is not None:
        (root / "shared").symlink_to(shared, target_is_directory=True)
    return work


def snippet_environment() -> dict[str, str]:
    """The environment a user of this checkout's virtual environment has, offline."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "HF_HUB_OFFLINE": "1",
            "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}


def run_snippet(snippet: Snippet, work: Path, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    """Run one block in ``work``: Python with this interpreter, bash with ``-euo pipefail``; a
    ``file:`` block is written instead."""
    if snippet.file_name is not None:
        (work / snippet.file_name).write_text(snippet.body)
        return subprocess.CompletedProcess([], 0, "", "")
    if snippet.language == "python":
        script = work / f"snippet_{snippet.page.stem}_{snippet.line}.py"
        script.write_text(snippet.body)
        command = [sys.executable, str(script)]
    else:
        command = ["bash", "-euo", "pipefail", "-c", snippet.body]
    return subprocess.run(command, cwd=work, env=snippet_environment(), capture_output=True, text=True,
                          timeout=timeout)
