"""Every test in this folder is end to end, so marked ``slow``: ``pytest -m "not slow"`` leaves them out."""

import pathlib

import pytest

HERE = pathlib.Path(__file__).parent


def pytest_collection_modifyitems(items):
  for item in items:
    if HERE in item.path.parents:
      item.add_marker(pytest.mark.slow)
