"""Every ```python block of README.md and docs/*.md runs as written.

Convention (also stated in README.md, "Documentation"):

* each block runs on its own, in a fresh namespace, from a temporary working directory: a
  reader copies one block, so one block must be complete (imports included);
* a block is skipped only when the line just before its opening fence (blank lines aside) is
  an HTML comment starting with ``<!-- no-test``, e.g. ``<!-- no-test: needs a download -->``;
  keep such exceptions rare (a block that cannot run here, not one that is inconvenient);
* ```bash and other languages are not executed.

A failing block is reported as ``<file>:<line of its first code line>`` and its traceback points
into the markdown file itself.
"""

from __future__ import annotations

import re
import textwrap
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?P<indent>\s*)```+\s*(?P<lang>[\w+-]*)")
PYTHON = {"python", "py", "python3"}
SKIP = re.compile(r"^\s*<!--\s*no-test\b")


@dataclass(frozen=True)
class Snippet:
    file: str  # relative to the repository root
    line: int  # 1-based line of the first code line
    code: str
    skipped: bool


def extract_snippets(text: str, file: str) -> list[Snippet]:
    """The fenced ```python blocks of a markdown text, with their positions and skip markers."""
    lines = text.splitlines()
    snippets, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if FENCE.match(lines[j])), None)
        if end is None:
            raise ValueError(f"{file}:{i + 1}: code fence is never closed")
        if match["lang"].lower() in PYTHON:
            previous = next((s for s in reversed(lines[:i]) if s.strip()), "")
            code = textwrap.dedent("\n".join(lines[i + 1 : end]))
            snippets.append(Snippet(file, i + 2, code, bool(SKIP.match(previous))))
        i = end + 1
    return snippets


def run_snippet(snippet: Snippet) -> None:
    """Execute one block; on failure raise ``AssertionError`` naming ``file:line``.

    The code is compiled under the markdown file's name, shifted to its line in that file, so
    the traceback shows the failing line of the documentation itself.
    """
    source = "\n" * (snippet.line - 1) + snippet.code
    try:
        exec(compile(source, snippet.file, "exec"), {"__name__": "__main__"})
    except Exception as err:
        trace = traceback.format_exc(limit=-8)
        raise AssertionError(
            f"{snippet.file}:{snippet.line}: the python block does not run "
            f"({type(err).__name__}: {err})\n{trace}"
        ) from err


def _all_snippets() -> list[Snippet]:
    return [
        s
        for path in DOC_FILES
        for s in extract_snippets(path.read_text(), path.relative_to(ROOT).as_posix())
    ]


def _param(snippet: Snippet) -> object:
    marks = []
    if snippet.skipped:
        marks.append(pytest.mark.skip(reason="marked <!-- no-test --> in the document"))
    return pytest.param(snippet, id=f"{snippet.file}:{snippet.line}", marks=marks)


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Run in an empty directory (trainers write logs there) and restore torch's thread count."""
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("snippet", [_param(s) for s in _all_snippets()])
def test_snippet_runs(snippet: Snippet, isolated: None) -> None:
    run_snippet(snippet)


# --------------------------------------------------------------------------- citations

# Notes and issue numbers that live outside the repository mean nothing to a user: the
# documents and docstrings cite the published papers and carry the math they need.
# A markdown link target that is a bare file name, ``](curvature.md)``, is a page of the site.
INTERNAL = re.compile(
    r"(?<!docs/)(?<!\]\()paper\.md|(?<!docs/)(?<!\]\()curvature\.md|shared/notes|\.\./shared"
    r"|\bissue \d",
    re.I,
)
CODE_DIRS = ("lightning_spectral", "benchmarks", "examples")
CITED_FILES = sorted({*DOC_FILES, *(p for d in CODE_DIRS for p in (ROOT / d).rglob("*.py"))})
@pytest.mark.parametrize(
    "path", [pytest.param(p, id=p.relative_to(ROOT).as_posix()) for p in CITED_FILES]
)
def test_no_reference_to_notes_outside_the_repository(path: Path) -> None:
    hits = [
        f"{path.relative_to(ROOT).as_posix()}:{n}: {line.strip()}"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if INTERNAL.search(line)
    ]
    assert not hits, "cite the published paper instead:\n" + "\n".join(hits)


# --------------------------------------------------------------------------- the harness itself

DOC = """# Title

```bash
exit 1
```

```python
x = 1
```

<!-- no-test: needs a download -->

```python
raise RuntimeError("never run")
```

- a list item:

  ```python
  y = 2
  assert y == 1, "wrong y"
  ```
"""


def test_extract_finds_python_blocks_lines_and_skip_markers() -> None:
    snippets = extract_snippets(DOC, "doc.md")
    assert [(s.line, s.skipped) for s in snippets] == [(8, False), (14, True), (20, False)]
    assert snippets[2].code == 'y = 2\nassert y == 1, "wrong y"'


def test_failure_names_file_and_line_and_the_traceback_points_into_the_document() -> None:
    failing = extract_snippets(DOC, "doc.md")[2]
    with pytest.raises(AssertionError, match=r"doc\.md:20: .*AssertionError: wrong y") as info:
        run_snippet(failing)
    assert 'File "doc.md", line 21' in str(info.value)
    run_snippet(extract_snippets(DOC, "doc.md")[0])


def test_unclosed_fence_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"doc\.md:1: code fence is never closed"):
        extract_snippets("```python\nx = 1\n", "doc.md")


def test_every_document_has_been_collected() -> None:
    files = {s.file for s in _all_snippets()}
    assert {"README.md", "docs/bounds.md", "docs/estimation.md"} <= files


def test_internal_notes_pattern_spares_links_between_pages_of_the_site() -> None:
    """A link from one documentation page to ``curvature.md`` is a page of the site itself."""
    assert not INTERNAL.search("[Curvature certificates](curvature.md)")
    assert not INTERNAL.search("see [docs/curvature.md](docs/curvature.md)")
    assert INTERNAL.search("as derived in curvature.md, section 3")
    assert INTERNAL.search("see ../shared/notes/curvature.md")
    assert INTERNAL.search("[the notes](../notes/curvature.md)")
