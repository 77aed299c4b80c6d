"""jlora's tests: one folder per stage of `jlora/_src`, `e2e/` for end-to-end runs (marked slow), and here the
repository's own checks (the API reference, the version)."""

import os

TESTS = os.path.dirname(os.path.abspath(__file__))  # this folder, where the helper scripts are
ROOT = os.path.dirname(TESTS)  # the checkout
