"""Tests of `jlora._src.interpret`, one file per module."""
