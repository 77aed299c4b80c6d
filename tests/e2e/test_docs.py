"""The documentation builds as the README says, with warnings as errors, executing every notebook.

This build is the one place the notebooks run (docs/conf.py): a cell error or a notebook slower than
``NOTEBOOK_SECONDS`` fails it, and the rendered pages must carry the outputs.
"""

import os
import pathlib
import re
import shlex

import jlora
import tests
from tests import _launch

ROOT = pathlib.Path(tests.ROOT)


def test_docs_build_renders_every_name_and_notebook(tmp_path):
  readme = (ROOT / "README.md").read_text()
  (command,) = re.findall(r"python -m sphinx [^\n`]*", readme)
  args = shlex.split(command)
  assert args[:5] == ["python", "-m", "sphinx", "-W", "--keep-going"], (
    "the README builds with warnings as errors"
  )
  out = tmp_path / "html"
  # The notebooks run as on a user's machine: without the test session's 8 simulated devices.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = _launch.python([*args[1:-1], str(out)], env=env, timeout=1500)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
  for name in jlora.__all__:
    assert (out / "_autosummary" / f"jlora.{name}.html").is_file(), f"no API page for jlora.{name}"
  for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
    page = out / "notebooks" / f"{path.stem}.html"
    assert page.is_file(), f"{path.name} is not in the docs"
    assert 'class="cell_output' in page.read_text(), f"{path.name} rendered without its outputs"
