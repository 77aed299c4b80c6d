"""Every notebook in notebooks/ runs top to bottom on a fresh kernel, with no cell erroring."""

import importlib.util
import json
import pathlib
import time

import pytest

import tests

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

ROOT = pathlib.Path(tests.ROOT)
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# The model code a notebook needs beyond jlora (the `notebooks` extra): without it the notebook's first cell
# would install it at run time, which the tests never do.
NEEDS = {"qlora_gemma3.ipynb": "keras_hub"}


def test_notebooks_exist_and_are_stripped():
  assert {p.name for p in NOTEBOOKS} >= {"quickstart.ipynb", "tpu_finetune.ipynb"}
  for path in NOTEBOOKS:
    for cell in json.loads(path.read_text())["cells"]:
      if cell["cell_type"] == "code":
        assert not cell["outputs"] and cell["execution_count"] is None, (
          f"{path.name}: stale outputs committed"
        )


def test_readme_links_every_notebook_with_a_colab_badge():
  readme = (ROOT / "README.md").read_text()
  for path in NOTEBOOKS:
    assert "colab.research.google.com/github/" in readme and f"/blob/main/notebooks/{path.name}" in readme


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path):
  if path.name in NEEDS and importlib.util.find_spec(NEEDS[path.name]) is None:
    pytest.skip(f"{path.name} needs {NEEDS[path.name]} (the `notebooks` extra)")
  book = nbformat.read(path, as_version=4)
  start = time.monotonic()
  nbclient.NotebookClient(
    book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
  ).execute()
  elapsed = time.monotonic() - start
  assert elapsed < 300, f"{path.name} took {elapsed:.0f}s; notebooks must run in well under 5 minutes"
