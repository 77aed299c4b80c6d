"""Tests of `jlora._src.api`, one file per module."""
