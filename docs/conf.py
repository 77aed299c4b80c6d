"""Sphinx configuration for jlora's documentation.

Sphinx with myst-nb, as optax, flax and orbax publish theirs: the guides are MyST Markdown (the README's
dialect, so sections move between them unchanged), the API reference comes from the docstrings through
autodoc/autosummary (Google style, read by napoleon; their ``>>>`` examples are the ones pytest runs as
doctests), and myst-nb renders the notebooks with their outputs.

The notebooks live in ``notebooks/`` at the repository root, stripped of outputs. Every build copies each of
them into ``docs/notebooks/`` (generated, ignored by git) and executes it on a fresh kernel: the only place
they run, in CI too (``tests/e2e/test_docs.py`` runs this build). A cell error fails the build, and so does a
notebook that takes longer than ``NOTEBOOK_SECONDS``.

Build: ``python -m sphinx -W --keep-going -b html docs docs/_build/html`` (``pip install -e ".[docs]"``).
"""

import pathlib
import shutil

from sphinx.errors import ExtensionError

import jlora

DOCS = pathlib.Path(__file__).parent
NOTEBOOK_SECONDS = 300  # each notebook must run well under 5 minutes on a 2-core CPU


def _copy_notebooks() -> None:
  """Mirrors ``notebooks/*.ipynb`` into ``docs/notebooks/``; kept mtimes spare re-reading unchanged ones."""
  target = DOCS / "notebooks"
  sources = {p.name: p for p in sorted((DOCS.parent / "notebooks").glob("*.ipynb"))}
  target.mkdir(exist_ok=True)
  for stale in target.glob("*.ipynb"):
    if stale.name not in sources:
      stale.unlink()
  for name, source in sources.items():
    shutil.copy2(source, target / name)


_copy_notebooks()

project = "jlora"
author = "jlora authors"
copyright = "jlora authors"  # noqa: A001 - the name Sphinx reads
release = version = jlora.__version__

extensions = [
  "myst_nb",
  "sphinx.ext.autodoc",
  "sphinx.ext.autosummary",
  "sphinx.ext.napoleon",
  "sphinx.ext.viewcode",
]
templates_path = ["_templates"]
exclude_patterns = ["_build", "_templates"]
# .rst first: autosummary writes its stub pages with the first suffix, and they are reStructuredText.
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}

# The API reference: one generated page per public name (docs/api.md lists them all; a test checks that).
autosummary_generate = True
autodoc_typehints = "description"
autodoc_member_order = "bysource"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # a NamedTuple's `Attributes:` as fields, not a second description of its members
default_role = "py:obj"  # docstrings write `stack` for a cross-reference to jlora.stack

myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3

# Notebooks: executed on every build, a failing cell fails it.
nb_execution_mode = "force"
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_execution_timeout = 600  # per cell; the whole notebook is bounded by NOTEBOOK_SECONDS below
nb_merge_streams = True

html_theme = "sphinx_book_theme"
html_title = f"jlora {version}"
html_theme_options = {"show_toc_level": 2}


def _check_notebook_times(app, env) -> None:
  """Fails the build when a notebook ran longer than ``NOTEBOOK_SECONDS``."""
  from myst_nb.sphinx_ import NbMetadataCollector

  for docname, data in NbMetadataCollector.get_doc_data(env).items():
    runtime = (data.get("exec_data") or {}).get("runtime")
    if runtime is not None and runtime > NOTEBOOK_SECONDS:
      raise ExtensionError(
        f"{docname}.ipynb took {runtime:.0f} s to execute; notebooks must run in under {NOTEBOOK_SECONDS} s "
        "on a 2-core CPU: make its model, data or training loop smaller."
      )


def setup(app):
  app.connect("env-updated", _check_notebook_times)
