"""jlora's version has one source, `jlora.__version__`, and the installed metadata agrees with it."""

import pathlib
import re
import tomllib
from importlib import metadata

import jlora
import tests

ROOT = pathlib.Path(tests.ROOT)


def test_version_has_one_source():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())
  assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
  assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "jlora.__version__"}
  assert re.fullmatch(r"\d+\.\d+\.\d+", jlora.__version__), jlora.__version__


def test_installed_metadata_matches_the_version():
  assert metadata.version("jlora") == jlora.__version__, (
    "the installed jlora is another version than this checkout: reinstall with `pip install -e .`"
  )


def test_changelog_has_the_version():
  changelog = (ROOT / "CHANGELOG.md").read_text()
  assert f"## [{jlora.__version__}]" in changelog, f"CHANGELOG.md has no section for {jlora.__version__}"
