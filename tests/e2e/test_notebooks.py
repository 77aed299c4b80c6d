"""Every notebook in notebooks/ is committed without outputs; the docs build executes and renders each one.

Executing them is `tests/e2e/test_docs.py`'s work: the docs build (docs/conf.py) runs every notebook on a
fresh kernel, fails on a cell error or on a notebook slower than its bound, and renders the outputs, so each
notebook runs once per test session.
"""

import json
import pathlib

import tests

ROOT = pathlib.Path(tests.ROOT)
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_notebooks_exist_and_are_stripped():
  assert {p.name for p in NOTEBOOKS} >= {"quickstart.ipynb", "tpu_finetune.ipynb", "qlora_gemma3.ipynb"}
  for path in NOTEBOOKS:
    for cell in json.loads(path.read_text())["cells"]:
      if cell["cell_type"] == "code":
        assert not cell["outputs"] and cell["execution_count"] is None, (
          f"{path.name}: stale outputs committed"
        )
