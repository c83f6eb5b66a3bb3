"""What a user expects of a package: license, changelog, metadata that agree with each other."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

import lightning_spectral

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_license_file_is_the_mit_license_the_metadata_declares(project: dict) -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License")
    assert "Copyright (c) 2026 lightning-spectral contributors" in text
    assert project["license"] == "MIT"
    assert "LICENSE" in project["license-files"]


def test_version_agrees_with_the_package(project: dict) -> None:
    assert project["version"] == lightning_spectral.__version__


def test_changelog_has_unreleased_then_the_current_version(project: dict) -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    headings = re.findall(r"^## \[([^\]]+)\](?: - (\d{4}-\d{2}-\d{2}))?$", text, re.M)
    assert headings[0] == ("Unreleased", "")
    assert headings[1][0] == project["version"] and headings[1][1], "release needs a date"
    for version, _ in headings:  # Keep a Changelog: every heading links to its diff
        assert re.search(rf"^\[{re.escape(version)}\]: https://", text, re.M), version


def test_project_urls_point_to_the_repository_and_the_site(project: dict) -> None:
    urls = project["urls"]
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert urls["Documentation"] == config["site_url"]
    assert urls["Repository"] == config["repo_url"]
    assert urls["Changelog"] == urls["Repository"] + "/blob/main/CHANGELOG.md"


def test_dev_extra_brings_the_documentation_tools(project: dict) -> None:
    extras = project["optional-dependencies"]
    assert {re.split(r"[<>=\[]", r)[0] for r in extras["docs"]} == {
        "mkdocs", "mkdocs-material", "mkdocstrings"}
    assert any(r.startswith("lightning-spectral[") and "docs" in r for r in extras["dev"])


def test_metadata_a_package_index_shows(project: dict) -> None:
    assert project["authors"] and project["keywords"]
    classifiers = project["classifiers"]
    assert "Programming Language :: Python :: 3 :: Only" in classifiers
    python = re.fullmatch(r">=3\.(\d+)", project["requires-python"])
    assert python and f"Programming Language :: Python :: 3.{python[1]}" in classifiers
