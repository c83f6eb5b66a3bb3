"""The documentation site builds with warnings as errors and documents every public name.

The site is built once per test session with ``mkdocs build --strict`` (the ``docs`` extra,
part of ``dev``), in a subprocess, into a temporary directory. ``mkdocs.yml`` turns broken
links, broken anchors and pages missing from the navigation into warnings, so a strict build
also checks those.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import lightning_spectral

ROOT = Path(__file__).resolve().parents[2]
DOCS_TOOLS = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")
# Modules with an API page; each page must document every name of its module's ``__all__``.
API_MODULES = (
    "lightning_spectral.functional",
    "lightning_spectral.callback",
    "lightning_spectral.network",
    "lightning_spectral.certify",
    "lightning_spectral.report",
    "lightning_spectral.plotting",
    "lightning_spectral.demos",
)
KEY_PAGES = (
    "index.html",
    "getting-started/index.html",
    "callback/index.html",
    "certification/index.html",
    "curvature/index.html",
    "report/index.html",
    "bounds/index.html",
    "estimation/index.html",
    "results/index.html",
    "crt/index.html",
    "benchmarks/index.html",
    "changelog/index.html",
    "api/index.html",
    "images/report_layers.png",
)


def _missing_tools() -> list[str]:
    missing = []
    for name in DOCS_TOOLS:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # the parent package of a dotted name is missing
            found = False
        if not found:
            missing.append(name)
    return missing


def build_site(project: Path, out: Path) -> subprocess.CompletedProcess[str]:
    """``mkdocs build --strict`` of ``project``'s ``mkdocs.yml`` into ``out``."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out),
         "-f", str(project / "mkdocs.yml")],
        cwd=project, env=env, capture_output=True, text=True, timeout=600,
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    missing = _missing_tools()
    if missing:
        pytest.skip(f"documentation tools not installed ({', '.join(missing)}): "
                    'pip install -e ".[docs]"')
    out = tmp_path_factory.mktemp("site")
    result = build_site(ROOT, out)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr}"
    return out


def _api_html(site: Path) -> str:
    return "\n".join(p.read_text() for p in sorted((site / "api").rglob("*.html")))


def _documented(html: str, name: str) -> bool:
    """True when some object heading of the API pages is ``lightning_spectral[.mod...].name``."""
    return re.search(rf'id="lightning_spectral(\.\w+)*\.{re.escape(name)}"', html) is not None


def test_key_pages_are_built(site: Path) -> None:
    missing = [page for page in KEY_PAGES if not (site / page).is_file()]
    assert not missing, f"pages missing from the built site: {missing}"
    changelog = (site / "changelog/index.html").read_text()
    assert "Unreleased" in changelog and "0.1.0" in changelog


def test_getting_started_gives_the_cpu_only_torch_hint(site: Path) -> None:
    # Code is highlighted token by token: compare the text without its tags.
    page = re.sub(r"<[^>]+>", "", (site / "getting-started/index.html").read_text())
    assert "https://download.pytorch.org/whl/cpu" in page
    assert "make demo" in page and "make test" in page


def test_every_top_level_name_is_in_the_api_reference(site: Path) -> None:
    html = _api_html(site)
    missing = [n for n in lightning_spectral.__all__ if not _documented(html, n)]
    assert not missing, f"lightning_spectral.__all__ names without an API entry: {missing}"


@pytest.mark.parametrize("module", API_MODULES)
def test_every_exported_name_of_a_module_is_in_its_api_page(site: Path, module: str) -> None:
    html = _api_html(site)
    names = importlib.import_module(module).__all__
    # Under the module, or under the submodule that defines it (a function named like its
    # submodule, as ``functional.matricize``, is shown there: the documentation tool sees the
    # submodule under the package's name).
    missing = [n for n in names
               if not re.search(rf'id="{re.escape(module)}(\.\w+)?\.{re.escape(n)}"', html)]
    assert not missing, f"{module}.__all__ names without an API entry: {missing}"


def test_a_broken_link_fails_the_strict_build(site: Path, tmp_path: Path) -> None:
    """The strict build is a real check: a link to a missing page is an error."""
    project = tmp_path / "project"
    shutil.copytree(ROOT / "docs", project / "docs")
    shutil.copy(ROOT / "mkdocs.yml", project / "mkdocs.yml")
    shutil.copy(ROOT / "CHANGELOG.md", project / "CHANGELOG.md")
    shutil.copytree(ROOT / "lightning_spectral", project / "lightning_spectral")
    index = project / "docs" / "index.md"
    index.write_text(index.read_text() + "\nSee [a page](no-such-page.md).\n")
    result = build_site(project, tmp_path / "out")
    assert result.returncode != 0
    assert "no-such-page.md" in result.stderr


# --------------------------------------------------------------------------- README links

LINK = re.compile(r"\]\((?P<inline>[^)\s]+)\)|^\[[^\]]+\]:\s*(?P<ref>\S+)", re.M)


def _readme_links() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [m["inline"] or m["ref"] for m in LINK.finditer(text)]


def _project_urls() -> dict[str, str]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]


def test_readme_links_are_absolute() -> None:
    """A package index shows the README without the repository: relative links break there."""
    links = _readme_links()
    assert links, "README.md has no links: the pattern is out of date"
    relative = [link for link in links if not re.match(r"https?://", link)]
    assert not relative, f"relative links in README.md: {relative}"


def test_readme_links_to_the_repository_name_existing_files() -> None:
    blob = _project_urls()["Repository"] + "/blob/main/"
    files = [link.removeprefix(blob).split("#")[0] for link in _readme_links()
             if link.startswith(blob)]
    assert files, "README.md links no file of the repository"
    missing = [f for f in files if not (ROOT / f).is_file()]
    assert not missing, f"README.md links files that do not exist: {missing}"


def test_readme_links_to_the_site_name_built_pages(site: Path) -> None:
    base = _project_urls()["Documentation"]
    pages = [link.removeprefix(base).split("#")[0] for link in _readme_links()
             if link.startswith(base)]
    assert pages, "README.md links no page of the documentation site"
    missing = [p for p in pages if not (site / p / "index.html").is_file()]
    assert not missing, f"README.md links pages the site does not have: {missing}"
