"""Tests of `jlora._src.io.checkpoint`, one file per module."""
