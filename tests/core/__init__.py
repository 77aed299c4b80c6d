"""Tests of `jlora._src.core`, one file per module."""
