"""The API reference (docs/api.md) lists every public name once, and nothing else: no build needed."""

import pathlib
import re

import jlora
import tests

API = (pathlib.Path(tests.ROOT) / "docs" / "api.md").read_text()


def _documented() -> list[str]:
  """The names under every ``.. autosummary::`` directive of docs/api.md."""
  names = []
  for block in re.findall(r"^\.\. autosummary::\n(.*?)^```", API, re.M | re.S):
    names += [ln.strip() for ln in block.splitlines() if ln.strip() and not ln.strip().startswith(":")]
  return names


def test_api_reference_lists_every_public_name_once():
  names = _documented()
  missing = sorted(set(jlora.__all__) - set(names))
  assert not missing, f"docs/api.md has no entry for {missing}: add each under an autosummary block"
  unknown = sorted(set(names) - set(jlora.__all__))
  assert not unknown, f"docs/api.md lists {unknown}, which are not in jlora.__all__"
  assert len(names) == len(set(names)), f"docs/api.md lists a name twice: {names}"


def test_api_reference_generates_a_page_per_name():
  blocks = re.findall(r"^\.\. autosummary::\n(.*?)^```", API, re.M | re.S)
  assert blocks and all(":toctree: _autosummary" in block for block in blocks)


def test_readme_links_point_into_the_repository():
  root = pathlib.Path(tests.ROOT)
  readme = (root / "README.md").read_text()
  links = re.findall(r"\]\(([^)\s]+)\)", readme)
  assert any(link.startswith("docs/") for link in links), "the README links into the docs"
  for link in links:
    assert "://" not in link, f"README.md links outside the repository: {link}"
    assert (root / link.split("#")[0]).exists(), f"README.md links to {link}, which does not exist"
