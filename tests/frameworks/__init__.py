"""Tests of `jlora._src.frameworks`, one file per module."""
