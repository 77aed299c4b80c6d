"""Tests of `jlora._src.adapters`, one file per module."""
