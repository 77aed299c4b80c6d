"""Tests of `jlora._src.io`, one file per module."""
