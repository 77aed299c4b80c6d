"""jlora's tests: one folder per stage of `jlora/_src`, and `e2e/` for end-to-end runs (marked slow)."""

import os

TESTS = os.path.dirname(os.path.abspath(__file__))  # this folder, where the helper scripts are
ROOT = os.path.dirname(TESTS)  # the checkout
